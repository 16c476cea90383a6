"""Calibration images from a folder (``recon.images``), on small generated PNG/JPEG files."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("torchvision")

from recon import images  # noqa: E402
from recon.cli import main  # noqa: E402
from recon.images import ImageFolderBatches, imagenet_transform  # noqa: E402


def _image(rng: np.random.Generator, h: int, w: int) -> PIL.Image:
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder-style tree: 6 PNGs, 5 JPEGs (one upper-case suffix, one grey), a
    corrupt JPEG, a text file with an image suffix, a non-image file and a hidden file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "puppies").mkdir(parents=True)
    for i in range(6):
        _image(rng, 20 + i, 30).save(root / "cat" / f"{i}.png")
    for i in range(4):
        _image(rng, 40, 24 + 2 * i).save(root / "dog" / f"{i}.JPG", format="JPEG")
    PIL.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(
        root / "dog" / "puppies" / "grey.jpeg"
    )
    good = (root / "cat" / "0.png").read_bytes()
    (root / "dog" / "corrupt.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (root / "dog" / "fake.jpg").write_text("not a picture")
    (root / "labels.csv").write_text("cat,0\ndog,1\n")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    return root


def test_find_images_recursive_and_sorted(folder):
    found, others = images.find_images(folder)
    names = [p.relative_to(folder).as_posix() for p in found]
    assert names == sorted(names) and len(names) == 13
    assert "dog/3.JPG" in names and "dog/puppies/grey.jpeg" in names
    assert sorted(p.name for p in others) == [".DS_Store", "labels.csv"]


def test_batches_skip_unreadable_files_and_count_them(folder):
    batches = ImageFolderBatches(folder, image_size=16, batch_size=4)
    shapes = [tuple(x.shape) for x in batches]
    assert shapes == [(4, 3, 16, 16), (4, 3, 16, 16), (3, 3, 16, 16)]
    assert batches.used == 11
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in batches.skipped) == ["corrupt.png", "fake.jpg"]
    assert all(why for _, why in batches.skipped)
    text = batches.summary()
    assert "11 images" in text and "2 unreadable files skipped" in text
    assert "corrupt.png" in text and "2 other files ignored" in text
    data = json.loads(json.dumps(batches.to_dict()))
    assert data["images"] == 11 and len(data["skipped"]) == 2 and data["ignored"] == 2
    # a second pass reads the same images again and does not double the counts
    again = torch.cat(list(batches))
    assert again.shape[0] == 11 and len(batches.skipped) == 2


def test_default_preprocessing_is_imagenet_normalised(tmp_path):
    """A flat grey image comes out as (v/255 - mean) / std in every pixel."""
    PIL.new("RGB", (50, 37), (128, 64, 200)).save(tmp_path / "flat.png")
    (x,) = list(ImageFolderBatches(tmp_path, image_size=24))
    assert x.shape == (1, 3, 24, 24) and x.dtype == torch.float32
    rgb = torch.tensor([128, 64, 200]) / 255
    want = (rgb - torch.tensor(images.IMAGENET_MEAN)) / torch.tensor(images.IMAGENET_STD)
    torch.testing.assert_close(x[0].mean((1, 2)), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(x[0], want[:, None, None].expand(3, 24, 24), atol=1e-5, rtol=0)


def test_default_size_is_224(folder):
    x = next(iter(ImageFolderBatches(folder, batch_size=2)))
    assert x.shape == (2, 3, 224, 224)


def test_resize_then_center_crop(tmp_path):
    """A wide image: the shorter side is resized to 256/224 of the crop, the centre kept."""
    img = np.zeros((56, 112, 3), dtype=np.uint8)
    img[:, 42:70] = 255  # a white band in the centre
    PIL.fromarray(img).save(tmp_path / "band.png")
    t = imagenet_transform(56)  # resize to 64 high, 128 wide, crop the centre 56 x 56
    x = t(PIL.open(tmp_path / "band.png").convert("RGB"))
    white = (1 - torch.tensor(images.IMAGENET_MEAN)) / torch.tensor(images.IMAGENET_STD)
    centre = x[:, 28, 28]
    torch.testing.assert_close(centre, white, atol=1e-4, rtol=0)
    assert x[:, 28, 0].lt(0).all()  # the left edge of the crop is dark


def test_max_images_is_a_seeded_random_subset(folder):
    def files(seed):
        b = ImageFolderBatches(folder, image_size=8, max_images=5, seed=seed)
        x = torch.cat(list(b))
        return x, [p.name for p in b.order()][:8]

    x0, order0 = files(0)
    x0b, order0b = files(0)
    _, order1 = files(1)
    assert x0.shape[0] == 5 and torch.equal(x0, x0b) and order0 == order0b
    assert order0 != order1
    full = ImageFolderBatches(folder, image_size=8, max_images=50)
    assert [p.name for p in full.order()] == [p.name for p in full.files]  # all: sorted


def test_max_images_counts_readable_images(tmp_path):
    """Unreadable files do not count towards max_images: the next readable file is taken."""
    rng = np.random.default_rng(1)
    for i in range(3):
        _image(rng, 10, 10).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}_bad.png").write_bytes(b"\x89PNG broken")
    b = ImageFolderBatches(tmp_path, image_size=8, max_images=3, seed=3)
    assert torch.cat(list(b)).shape[0] == 3 and b.used == 3


def test_decoding_is_lazy_batch_by_batch(folder, monkeypatch):
    """Only one batch of images is decoded before it is handed out."""
    opened = []
    real_open = PIL.open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(PIL, "open", counting_open)
    batches = ImageFolderBatches(folder, image_size=8, batch_size=3)
    assert opened == []  # listing the folder decodes nothing
    it = iter(batches)
    next(it)
    assert len(opened) <= 5  # 3 images, plus the unreadable files met on the way
    next(it)
    assert len(opened) <= 8


def test_strict_names_the_unreadable_file(folder):
    batches = ImageFolderBatches(folder, image_size=8, strict=True)
    with pytest.raises(ValueError, match=r"corrupt.png' cannot be decoded.*strict"):
        list(batches)


def test_custom_transform(folder):
    def transform(img):
        return torch.zeros(1, 5, 7)

    x = torch.cat(list(ImageFolderBatches(folder, transform=transform)))
    assert x.shape == (11, 1, 5, 7)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, r"'batch_size' must be an int >= 1\. Got 0"),
        ({"max_images": 0}, ValueError, r"'max_images' must be an int >= 1\. Got 0"),
        ({"seed": -1}, ValueError, r"'seed' must be an int >= 0"),
        ({"image_size": 0}, ValueError, r"'image_size' must be an int >= 1"),
        ({"transform": "resize"}, TypeError, r"'transform' must be a callable.*str"),
    ],
)
def test_bad_arguments(folder, kwargs, error, match):
    with pytest.raises(error, match=match):
        ImageFolderBatches(folder, **kwargs)


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match=r"existing folder.*nope"):
        ImageFolderBatches(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds no image files.*1 other files"):
        ImageFolderBatches(tmp_path)
    (tmp_path / "b.png").write_text("not png")
    with pytest.raises(ValueError, match=r"no readable image.*b.png"):
        list(ImageFolderBatches(tmp_path))


def test_transform_giving_other_shapes(folder):
    sizes = iter(range(1, 100))

    def transform(img):
        return torch.zeros(3, next(sizes), 4)

    with pytest.raises(ValueError, match=r"same shape"):
        list(ImageFolderBatches(folder, transform=transform))


def test_torchvision_weights_transforms_need_no_download():
    t = images.torchvision_transform("resnet50", "IMAGENET1K_V2")
    assert list(t.crop_size) == [224] and list(t.resize_size) == [232]
    assert images.torchvision_weights("resnet50", "ResNet50_Weights.DEFAULT").name == (
        "IMAGENET1K_V2"
    )
    with pytest.raises(ValueError, match=r"weights name of resnet18 \(DEFAULT, IMAGENET1K_V1\)"):
        images.torchvision_weights("resnet18", "IMAGENET1K_V9")
    with pytest.raises(ValueError, match=r"weights name"):
        images.torchvision_weights("resnet18", "ResNet50_Weights.IMAGENET1K_V1")


def test_missing_pillow_names_the_extra(folder, monkeypatch):
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(ImportError, match=r"'vision' extra: pip install 'recon\[vision\]'"):
        ImageFolderBatches(folder)


# --------------------------------------------------------------------------- the CLI


def _prune_folder(folder, tmp_path, *extra):
    report = tmp_path / "report.json"
    argv = [
        "prune",
        "--model",
        "tests.test_cli:make_vgg",
        "--data",
        str(folder),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--keep-ratio",
        "0.5",
        "--method",
        "l1",
        "--reconstruct",
        "none",
        "--report",
        str(report),
        "--quiet",
        *extra,
    ]
    return main(argv), report


def test_cli_prunes_from_an_image_folder(folder, tmp_path, capsys):
    code, report = _prune_folder(folder, tmp_path)
    assert code == 0
    out = capsys.readouterr().out
    assert "calibration: 11 images from" in out and "2 unreadable files skipped" in out
    data = json.loads(report.read_text())
    assert data["calibration"]["images"] == 11 and len(data["calibration"]["skipped"]) == 2
    assert len(data["layers"]) == 8


def test_cli_max_images_and_strict(folder, tmp_path, capsys):
    code, report = _prune_folder(folder, tmp_path, "--max-images", "3", "--seed", "2")
    assert code == 0
    assert json.loads(report.read_text())["calibration"]["images"] == 3
    capsys.readouterr()
    code, _ = _prune_folder(folder, tmp_path, "--strict")
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot be decoded" in err and ("corrupt.png" in err or "fake.jpg" in err)


def test_cli_image_folder_of_the_wrong_size_is_a_clear_error(folder, tmp_path, capsys):
    code, _ = _prune_folder(folder, tmp_path, "--image-size", "8")
    assert code == 2
    assert "do not fit the model" in capsys.readouterr().err


def test_cli_uses_the_torchvision_weights_transforms(folder, tmp_path, capsys):
    """--weights naming torchvision weights: their transforms (ResNet-50 V2: resize 232);
    a weights file: the standard pipeline at --image-size. Nothing is downloaded."""
    import argparse

    from recon.cli import _image_batches

    def batches(weights, image_size=None):
        args = argparse.Namespace(
            model="torchvision:resnet50",
            weights=weights,
            image_size=image_size,
            data=str(folder),
            batch_size=2,
            strict=False,
            seed=0,
        )
        return _image_batches(args, max_images=2)

    b = batches("IMAGENET1K_V2", image_size=64)
    assert list(b.transform.resize_size) == [232]
    assert "--image-size 64 ignored" in capsys.readouterr().err
    assert next(iter(b)).shape == (2, 3, 224, 224)
    (tmp_path / "w.pt").write_bytes(b"")
    b = batches(str(tmp_path / "w.pt"), image_size=40)
    assert next(iter(b)).shape == (2, 3, 40, 40)
