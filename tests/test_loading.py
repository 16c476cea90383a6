"""The files the command line reads (``recon.loading``): safe by default.

A hostile pickle (its ``__reduce__`` opens a marker file for writing) goes through
every CLI path that reads a file: without ``--unsafe-pickle`` the marker never
appears and the error names the file and the flag; with the flag, harmless pickled
objects load.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from recon import loading
from recon.cli import main
from recon.models import digits_vgg, vgg11

pytestmark = pytest.mark.filterwarnings("ignore:re-fitting:UserWarning")


class Hostile:
    """Unpickling this creates the file ``marker`` (stands for any code the author chose)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_vgg():
    torch.manual_seed(0)
    return vgg11(width=0.125)


@pytest.fixture
def hostile(tmp_path):
    """Hostile files of every kind the CLI reads, and the marker they would create."""
    marker = tmp_path / "PWNED"
    h = Hostile(marker)
    files = {
        "module.pt": h,  # what a pickled module is: objects rebuilt by calling code
        "state.pt": {"features.0.weight": torch.zeros(1), "evil": h},
        "data.pt": {"inputs": torch.zeros(4, 3, 32, 32), "meta": h},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    np.save(tmp_path / "data.npy", np.array([h], dtype=object), allow_pickle=True)
    import pickle

    with open(tmp_path / "raw.pkl", "wb") as f:  # a plain pickle, no torch zip container
        pickle.dump(h, f)
    return tmp_path, marker


FACTORY = "tests.test_loading:make_vgg"
CALIB = "calib.pt"  # written by the `calib` fixture


@pytest.fixture
def calib(tmp_path):
    torch.save(
        torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), tmp_path / CALIB
    )


PATHS = [
    ("prune", "--model", "module.pt"),
    ("prune", "--model", "raw.pkl"),
    ("prune", "--weights", "state.pt"),
    ("prune", "--weights", "module.pt"),
    ("prune", "--data", "data.pt"),
    ("prune", "--data", "data.npy"),
    ("eval", "--model", "module.pt"),
    ("eval", "--weights", "state.pt"),
    ("bench", "--model", "module.pt"),
    ("bench", "--weights", "state.pt"),
    ("bench", "--data", "data.pt"),
    ("bench", "--data", "data.npy"),
]


def _argv(tmp_path, command, flag, name):
    argv = {"--model": FACTORY, "--data": str(tmp_path / CALIB)}
    if command == "eval":
        argv.pop("--data")
    argv[flag] = str(tmp_path / name)
    out = [command]
    for k, v in argv.items():
        out += [k, v]
    return out + (["--keep-ratio", "0.5", "--quiet"] if command == "prune" else [])


@pytest.mark.parametrize(("command", "flag", "name"), PATHS)
def test_hostile_pickle_is_refused_on_every_path(hostile, calib, command, flag, name, capsys):
    tmp_path, marker = hostile
    assert main(_argv(tmp_path, command, flag, name)) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"The '{flag}' file '{tmp_path / name}' holds pickled Python objects" in err
    assert "--unsafe-pickle" in err and "Traceback" not in err
    if name != "data.npy":
        assert "io.open" in err  # what the file would have called


def test_hostile_pickle_on_the_torchvision_path(hostile, capsys):
    pytest.importorskip("torchvision")
    tmp_path, marker = hostile
    code = main(
        ["eval", "--model", "torchvision:resnet18", "--weights", str(tmp_path / "state.pt")]
    )
    assert code == 2 and not marker.exists()
    assert "state.pt' holds pickled Python objects" in capsys.readouterr().err


def test_hostile_files_in_an_image_folder_are_never_unpickled(hostile, tmp_path, capsys):
    pytest.importorskip("PIL")
    from PIL import Image

    src, marker = hostile
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (36, 36), (40 * i, 90, 20)).save(folder / f"{i}.png")
    (folder / "evil.png").write_bytes((src / "raw.pkl").read_bytes())
    (folder / "evil.pt").write_bytes((src / "module.pt").read_bytes())
    argv = ["prune", "--model", FACTORY, "--data", str(folder), "--image-size", "32"]
    assert main([*argv, "--channels", "features.0=4", "--method", "l1", "--quiet"]) == 0
    assert not marker.exists()
    out = capsys.readouterr().out
    assert "4 images" in out and "1 unreadable file skipped: " in out and "evil.png" in out


# --------------------------------------------------------------------------- with the flag


def test_unsafe_pickle_reads_a_whole_module(tmp_path, calib, capsys):
    torch.save(make_vgg(), tmp_path / "vgg.pt")
    argv = ["prune", "--model", str(tmp_path / "vgg.pt"), "--data", str(tmp_path / CALIB)]
    assert main([*argv, "--channels", "features.0=4", "--quiet", "--unsafe-pickle"]) == 0
    assert "features.0" in capsys.readouterr().out


def test_unsafe_pickle_reads_a_checkpoint_with_other_objects(tmp_path, calib):
    net = make_vgg()
    with torch.no_grad():
        net.features[0].weight.fill_(0.5)
    ckpt = {"state_dict": net.state_dict(), "args": argparse.Namespace(lr=0.1), "epoch": 3}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(loading.PickleRefusedError, match=r"ckpt.pt.*argparse.Namespace"):
        loading.load_model(FACTORY, str(tmp_path / "ckpt.pt"))
    model = loading.load_model(FACTORY, str(tmp_path / "ckpt.pt"), unsafe_pickle=True)
    assert torch.equal(model.features[0].weight, net.features[0].weight)


def test_unsafe_pickle_reads_data_with_other_objects(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    torch.save({"inputs": x, "meta": argparse.Namespace(source="camera")}, tmp_path / "d.pt")
    np.save(tmp_path / "d.npy", np.array(x.numpy(), dtype=object), allow_pickle=True)
    for name in ("d.pt", "d.npy"):
        with pytest.raises(loading.PickleRefusedError, match=name):
            loading.load_data(str(tmp_path / name))
        got, _ = loading.load_data(str(tmp_path / name), unsafe_pickle=True)
        assert torch.equal(got, x)


def test_unsafe_pickle_on_eval_and_bench(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    torch.save(digits_vgg(), tmp_path / "digits.pt")
    spec = str(tmp_path / "digits.pt")
    assert main(["eval", "--model", spec, "--data", "digits", "--unsafe-pickle"]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out
    seen = []

    def loaded(model, x, **kwargs):  # stands in for the benchmark itself (slow)
        seen.append((model, x))
        raise ValueError("benchmark skipped")

    monkeypatch.setattr("recon.bench.run", loaded)
    argv = ["bench", "--model", spec, "--data", "digits", "--max-images", "16"]
    assert main([*argv, "--unsafe-pickle"]) == 2
    assert "benchmark skipped" in capsys.readouterr().err
    assert type(seen[0][0]).__name__ == "VGG" and seen[0][1].shape == (16, 1, 8, 8)


# --------------------------------------------------------------------------- plain files


def test_model_file_with_weights_only_says_how_to_load_it(tmp_path, capsys):
    torch.save(make_vgg().state_dict(), tmp_path / "sd.pt")
    assert main(["eval", "--model", str(tmp_path / "sd.pt")]) == 2
    err = capsys.readouterr().err
    assert "sd.pt' holds a state_dict, not a model" in err and "--weights" in err


def test_weights_that_do_not_fit_name_the_file(tmp_path, capsys):
    torch.save(vgg11(width=0.25).state_dict(), tmp_path / "wide.pt")
    assert main(["eval", "--model", FACTORY, "--weights", str(tmp_path / "wide.pt")]) == 2
    err = capsys.readouterr().err
    assert "'--weights' file" in err and "wide.pt' does not fit the model of --model" in err
    assert "size mismatch" in err and "recon.save" in err


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p.write_bytes(b"\x00garbage" * 20), r"cannot be read by torch.load.*damaged"),
        (lambda p: p.write_bytes(b"hello" * 20), r"cannot be read by torch.load.*damaged"),
        (lambda p: torch.save([1, 2, 3], p), r"must hold a state_dict.*Got list"),
    ],
    ids=["garbage", "text", "a_list"],
)
def test_unreadable_weights(tmp_path, make, match):
    make(tmp_path / "w.pt")
    with pytest.raises(ValueError, match=match):
        loading.load_model(FACTORY, str(tmp_path / "w.pt"))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: np.save(p, np.array(["a", "b"])), r"must hold numbers.*<U1"),
        (lambda p: p.write_bytes(b"\x93NUMPY garbage"), r"cannot be read"),
    ],
    ids=["strings", "garbage"],
)
def test_unreadable_npy(tmp_path, make, match):
    make(tmp_path / "d.npy")
    with pytest.raises(ValueError, match=match):
        loading.load_data(str(tmp_path / "d.npy"))


def test_torchvision_weights_names(tmp_path):
    pytest.importorskip("torchvision")
    assert loading.torchvision_weights_name("torchvision:resnet18", "DEFAULT") == "DEFAULT"
    assert loading.torchvision_weights_name("recon.models:vgg11", "DEFAULT") is None
    with pytest.raises(ValueError, match=r"'--weights' file 'gone/w.pth' does not exist"):
        loading.torchvision_weights_name("torchvision:resnet18", "gone/w.pth")
    with pytest.raises(ValueError, match=r"weights name of resnet18 \(DEFAULT, IMAGENET1K_V1\)"):
        loading.torchvision_weights_name("torchvision:resnet18", "IMAGENET")
