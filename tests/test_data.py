"""Tests of recon.data (IDX reader, (Fashion-)MNIST loaders and downloads, the embedded
subset, digits split, evaluate) and the embedded default model."""

from __future__ import annotations

import gzip
import hashlib
import struct
import threading
import warnings
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from recon import _default, data
from recon._default import CACHE_FILE, default_model
from recon.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    evaluate,
    load_digits_split,
    load_embedded,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    to_tensor32,
)
from recon.models import digits_vgg

# --------------------------------------------------------------------------------------
# load_digits_split
# --------------------------------------------------------------------------------------


def test_split_shapes_dtypes_and_normalisation():
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    assert x_train.shape == (1257, 1, 8, 8)
    assert x_test.shape == (540, 1, 8, 8)
    assert y_train.shape == (1257,) and y_test.shape == (540,)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    assert x_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x_train.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # The test split is normalised with the train statistics, not its own.
    assert x_test.mean().item() != pytest.approx(0.0, abs=1e-5)
    assert abs(x_test.mean().item()) < 0.1


def test_split_is_deterministic_and_seed_dependent():
    a = load_digits_split(seed=3)
    b = load_digits_split(seed=3)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta, tb)
    c = load_digits_split(seed=4)
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_stratified_and_a_partition(seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed, test_fraction=0.25)
    full = np.bincount(digits.target, minlength=10)
    n_test = np.bincount(y_test.numpy(), minlength=10)
    n_train = np.bincount(y_train.numpy(), minlength=10)
    np.testing.assert_array_equal(n_train + n_test, full)
    # Stratified: each class's test count is within 1 of its proportional share.
    assert np.all(np.abs(n_test - full * 0.25) <= 1)
    assert len(y_test) == int(np.ceil(len(digits.target) * 0.25))
    assert len(x_train) == len(y_train) and len(x_test) == len(y_test)


def test_split_is_a_partition_of_the_raw_data():
    """Train and test together are exactly the data set, pixels and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    x = torch.cat([x_train, x_test]).double().reshape(-1, 64)
    # Undo the (unknown) affine normalisation with the known [0, 1] pixel range.
    lo, hi = x.min(), x.max()
    raw = ((x - lo) / (hi - lo) * 16).round().numpy()
    rows_ours = sorted(map(tuple, np.column_stack([raw, torch.cat([y_train, y_test]).numpy()])))
    rows_ref = sorted(map(tuple, np.column_stack([digits.data, digits.target])))
    assert rows_ours == rows_ref


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1])
def test_split_bad_fraction(bad):
    with pytest.raises(ValueError, match="'test_fraction'"):
        load_digits_split(test_fraction=bad)


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------


class ConstantClass(nn.Module):
    """Outputs the one-hot logits of a fixed class; records the mode it ran in."""

    def __init__(self, cls: int, num_classes: int = 10) -> None:
        super().__init__()
        self.cls = cls
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))
        self.child = nn.Identity()
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        onehot = torch.zeros(len(x), self.num_classes)
        onehot[:, self.cls] = 1
        return onehot * self.scale


@pytest.mark.parametrize("cls", [0, 3, 9])
def test_evaluate_constant_model_gives_class_frequency(cls):
    _, _, x_test, y_test = load_digits_split(seed=0)
    model = ConstantClass(cls)
    acc = evaluate(model, x_test, y_test, batch_size=64)
    assert acc == pytest.approx((y_test == cls).double().mean().item())
    assert 0.05 < acc < 0.15
    assert model.seen_training and not any(model.seen_training)
    assert len(model.seen_training) == int(np.ceil(len(y_test) / 64))


def test_evaluate_restores_modes_and_batches_agree():
    torch.manual_seed(0)
    x = torch.randn(50, 1, 8, 8)
    y = torch.randint(0, 10, (50,))
    model = digits_vgg()
    model.train()
    model.features[1].eval()  # a mixed-mode model keeps its mix
    acc = evaluate(model, x, y, batch_size=7)
    assert model.training
    assert not model.features[1].training
    assert model.features[4].training
    assert acc == evaluate(model, x, y, batch_size=50)
    with torch.no_grad():
        model.eval()
        expected = (model(x).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(expected)

    model.eval()
    evaluate(model, x, y)
    assert not model.training


def test_evaluate_perfect_and_bad_arguments():
    y = torch.tensor([2, 2, 2])
    assert evaluate(ConstantClass(2), torch.zeros(3, 1), y) == 1.0
    assert evaluate(ConstantClass(1), torch.zeros(3, 1), y) == 0.0
    with pytest.raises(ValueError, match="'y'"):
        evaluate(ConstantClass(1), torch.zeros(4, 1), y)
    with pytest.raises(ValueError, match="'batch_size'"):
        evaluate(ConstantClass(1), torch.zeros(3, 1), y, batch_size=0)
    with pytest.raises(TypeError, match="'model'"):
        evaluate(lambda x: x, torch.zeros(3, 1), y)


# --------------------------------------------------------------------------------------
# default_model and its cache
# --------------------------------------------------------------------------------------


@pytest.fixture
def spy_train(monkeypatch):
    """Counts calls of recon._default.train while still training for real."""
    calls: list[dict] = []
    real = _default.train

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_default, "train", spy)
    return calls


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_default_model_trains_caches_and_reloads(tmp_path, monkeypatch, spy_train):
    _, _, x_test, y_test = load_digits_split(seed=0)
    rng_before = torch.get_rng_state()

    model = default_model(cache_dir=tmp_path, progress=False)
    assert len(spy_train) == 1
    assert not model.training
    assert evaluate(model, x_test, y_test) >= 0.95
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    path = tmp_path / CACHE_FILE
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_FILE]  # no temp file left
    state = torch.load(path, weights_only=True)
    assert set(state) == set(model.state_dict())

    def no_train(*args, **kwargs):
        raise AssertionError("train must not be called when the cache is valid")

    monkeypatch.setattr(_default, "train", no_train)
    again = default_model(cache_dir=tmp_path, progress=False)
    assert again is not model
    assert not again.training
    torch.testing.assert_close(_outputs(again, x_test), _outputs(model, x_test), rtol=0, atol=0)


def test_default_model_env_cache_dir(tmp_path, monkeypatch, spy_train):
    monkeypatch.setattr(_default, "DEFAULT_EPOCHS", 1)
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "env"))
    default_model(progress=False)
    assert (tmp_path / "env" / CACHE_FILE).is_file()
    assert len(spy_train) == 1
    # An explicit cache_dir wins over the environment.
    default_model(cache_dir=tmp_path / "arg", progress=False)
    assert (tmp_path / "arg" / CACHE_FILE).is_file()
    assert len(spy_train) == 2


def test_default_model_is_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(_default, "DEFAULT_EPOCHS", 1)
    a = default_model(cache_dir=tmp_path / "a", progress=False).state_dict()
    torch.manual_seed(123)  # the global RNG state must not matter
    b = default_model(cache_dir=tmp_path / "b", progress=False).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["garbage", "empty", "wrong_shapes", "wrong_keys", "not_dict"])
def test_default_model_bad_cache_is_retrained(tmp_path, monkeypatch, spy_train, kind):
    monkeypatch.setattr(_default, "DEFAULT_EPOCHS", 1)
    path = tmp_path / CACHE_FILE
    if kind == "garbage":
        path.write_bytes(b"this is not a torch file")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wrong_shapes":
        torch.save(digits_vgg(width=0.5).state_dict(), path)
    elif kind == "wrong_keys":
        state = digits_vgg().state_dict()
        state["extra.weight"] = torch.zeros(1)
        torch.save(state, path)
    else:
        torch.save([torch.zeros(1)], path)

    with pytest.warns(UserWarning, match="retraining"):
        model = default_model(cache_dir=tmp_path, progress=False)
    assert len(spy_train) == 1
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # The cache was overwritten with a loadable state_dict: no warning, no training now.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = default_model(cache_dir=tmp_path, progress=False)
    assert len(spy_train) == 1
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(_outputs(again, x), _outputs(model, x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# read_idx
# --------------------------------------------------------------------------------------

IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: magic, big-endian dims, big-endian data."""
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, payload: bytes, *, compress: bool) -> Path:
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5).astype(np.uint8)
    # The file name does not decide compression: the content does.
    got_images = read_idx(write(tmp_path / "images-idx3", idx_bytes(images), compress=compress))
    got_labels = read_idx(write(tmp_path / "labels.gz", idx_bytes(labels), compress=compress))
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    assert got_labels.dtype == np.uint8 and got_labels.shape == (5,)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.flags.writeable and got_images.flags.owndata


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_big_endian_types(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 11).astype(dtype) * dtype(3)
    got = read_idx(write(tmp_path / "a.idx", idx_bytes(array), compress=False))
    assert got.dtype == np.dtype(dtype)  # native byte order
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_read_idx_empty_dimension(tmp_path):
    got = read_idx(
        write(tmp_path / "e", idx_bytes(np.zeros((0, 28, 28), np.uint8)), compress=False)
    )
    assert got.shape == (0, 28, 28)


GOOD = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "not an IDX file"),
        (b"\x01" + GOOD[1:], "not an IDX file"),
        (GOOD[:2] + b"\x07" + GOOD[3:], "type code 0x07"),
        (GOOD[:6], "truncated: its header"),
        (GOOD[:-1], "truncated: shape \\(3, 4\\) of uint8 needs 12 bytes of data, got 11"),
        (GOOD + b"\x00", "longer than its header says"),
    ],
    ids=["empty", "magic", "type-code", "short-header", "short-data", "trailing"],
)
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_errors_name_the_file(tmp_path, payload, message, compress):
    path = write(tmp_path / "broken-idx2-ubyte", payload, compress=compress)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert "broken-idx2-ubyte" in str(info.value)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(GOOD * 50)[:-12])
    with pytest.raises(ValueError, match=r"cut\.gz.*not a valid gzip stream"):
        read_idx(path)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


# --------------------------------------------------------------------------------------
# load_fashion_mnist / load_mnist on tiny generated files
# --------------------------------------------------------------------------------------

LOADERS = {"fashion-mnist": load_fashion_mnist, "mnist": load_mnist}


def md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


@pytest.fixture(params=["fashion-mnist", "mnist"])
def fake(request, tmp_path, monkeypatch):
    """Tiny generated IDX files for both splits, with the loader's checksum table
    patched to their MD5s and the system folder pointed at an empty place.

    ``RECON_CACHE`` points into ``tmp_path`` so that no test can touch the real cache.
    """
    name = request.param
    rng = np.random.default_rng(1)
    raw, arrays = {}, {}
    for split, n in (("train", 30), ("test", 20)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        stem_images, stem_labels = data._SPLITS[split]
        raw[stem_images], raw[stem_labels] = idx_bytes(images), idx_bytes(labels)
        arrays[split] = (images, labels.astype(np.int64))
    gz = {stem: gzip.compress(payload, mtime=0) for stem, payload in raw.items()}
    spec = replace(
        data._DATASETS[name],
        system_dir=str(tmp_path / "system"),
        checksums={stem: (md5(gz[stem]), md5(raw[stem])) for stem in raw},
    )
    monkeypatch.setitem(data._DATASETS, name, spec)
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "env-cache"))
    return SimpleNamespace(
        name=name, load=LOADERS[name], spec=spec, raw=raw, gz=gz, arrays=arrays, tmp=tmp_path
    )


def put(fake, directory: Path, split: str, *, compress: bool = True, only=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stem in data._SPLITS[split]:
        if only is None or stem in only:
            name, payload = (f"{stem}.gz", fake.gz[stem]) if compress else (stem, fake.raw[stem])
            (directory / name).write_bytes(payload)
    return directory


def assert_split(got, expected):
    images, labels = got
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
    assert labels.dtype == np.int64 and labels.shape == (len(images),)
    np.testing.assert_array_equal(images, expected[0])
    np.testing.assert_array_equal(labels, expected[1])


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_from_data_dir(fake, split, compress):
    folder = put(fake, fake.tmp / "mine", split, compress=compress)
    assert_split(fake.load(split, data_dir=folder), fake.arrays[split])
    assert not (fake.tmp / "env-cache").exists()  # nothing cached from a data_dir


def test_data_dir_missing_file_is_an_error(fake):
    # data_dir is exclusive: the file is in the cache, but data_dir lacks it.
    put(fake, fake.tmp / "env-cache" / fake.name, "test")
    folder = put(fake, fake.tmp / "mine", "test", only={"t10k-images-idx3-ubyte"})
    with pytest.raises(FileNotFoundError, match=r"'data_dir'.*mine.*t10k-labels-idx1-ubyte"):
        fake.load("test", data_dir=folder)


def test_data_dir_files_are_verified(fake):
    folder = put(fake, fake.tmp / "mine", "test", compress=False)
    labels = bytearray(fake.raw["t10k-labels-idx1-ubyte"])
    labels[-1] ^= 1  # a valid IDX file with one wrong label
    (folder / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte' is not the official"):
        fake.load("test", data_dir=folder)


def test_system_folder_then_cache(fake):
    system = put(fake, Path(fake.spec.system_dir), "test", compress=False)
    assert_split(fake.load("test"), fake.arrays["test"])
    # With the system folder gone, the (env) cache is used.
    for f in system.iterdir():
        f.unlink()
    put(fake, fake.tmp / "env-cache" / fake.name, "test")
    assert_split(fake.load("test"), fake.arrays["test"])
    # An explicit cache_dir wins over the environment.
    with pytest.raises(FileNotFoundError):
        fake.load("test", cache_dir=fake.tmp / "elsewhere")


def test_not_found_message(fake):
    with pytest.raises(FileNotFoundError) as info:
        fake.load("train", cache_dir=fake.tmp / "c")
    message = str(info.value)
    assert "train-images-idx3-ubyte[.gz]" in message
    assert str(fake.tmp / "c" / fake.name) in message
    assert "--data-dir" in message and "download=True" in message
    assert fake.spec.mirror in message
    if fake.name == "fashion-mnist":
        assert fake.spec.system_dir in message
        assert "apt-get install dataset-fashion-mnist" in message
    else:
        assert "apt-get" not in message


def test_bad_split(fake):
    with pytest.raises(ValueError, match="'split' parameter of load_"):
        fake.load("validation")


# --------------------------------------------------------------------------------------
# Downloads from a local HTTP server
# --------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (body, declared Content-Length)``; logs requests."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        body, declared = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)  # HTTP/1.0: the connection closes after this

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/data"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def serve(server, fake, split: str) -> None:
    for stem in data._SPLITS[split]:
        server.routes[f"/data/{stem}.gz"] = (fake.gz[stem], len(fake.gz[stem]))


def test_download_verifies_caches_and_reuses(fake, server):
    serve(server, fake, "test")
    cache = fake.tmp / "c"
    got = fake.load("test", download=True, cache_dir=cache, mirror=server.url)
    assert_split(got, fake.arrays["test"])
    assert sorted(server.requests) == [
        "/data/t10k-images-idx3-ubyte.gz",
        "/data/t10k-labels-idx1-ubyte.gz",
    ]
    # Exactly the two verified archives, no temporary file.
    files = sorted(p.name for p in (cache / fake.name).iterdir())
    assert files == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    for name in files:
        assert (cache / fake.name / name).read_bytes() == fake.gz[name[:-3]]
    # Second time: from the cache, no request, with or without download=True.
    assert_split(fake.load("test", cache_dir=cache), fake.arrays["test"])
    assert_split(fake.load("test", download=True, cache_dir=cache, mirror=server.url), got)
    assert len(server.requests) == 2


def test_download_completes_a_partial_cache_from_the_default_mirror(fake, server, monkeypatch):
    monkeypatch.setitem(data._DATASETS, fake.name, replace(fake.spec, mirror=server.url + "/"))
    serve(server, fake, "train")
    put(fake, fake.tmp / "env-cache" / fake.name, "train", only={"train-images-idx3-ubyte"})
    assert_split(fake.load("train", download=True), fake.arrays["train"])
    assert server.requests == ["/data/train-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("fault", ["corrupt", "truncated-file", "short-transfer", "missing"])
def test_bad_download_raises_and_caches_nothing(fake, server, fault):
    serve(server, fake, "test")
    path = "/data/t10k-labels-idx1-ubyte.gz"
    body = fake.gz["t10k-labels-idx1-ubyte"]
    if fault == "corrupt":  # same length, one byte flipped
        server.routes[path] = (body[:20] + bytes([body[20] ^ 0xFF]) + body[21:], len(body))
    elif fault == "truncated-file":  # a shorter file, served honestly
        server.routes[path] = (body[:-5], len(body) - 5)
    elif fault == "short-transfer":  # the connection drops before Content-Length bytes
        server.routes[path] = (body[:-5], len(body))
    else:
        del server.routes[path]
    expected = {
        "corrupt": (ValueError, "has MD5 .* expected .*nothing was cached"),
        "truncated-file": (ValueError, "has MD5 .* expected .*nothing was cached"),
        "short-transfer": (OSError, "truncated|IncompleteRead"),
        "missing": (OSError, "404.*nothing was cached"),
    }[fault]
    cache = fake.tmp / "c"
    with pytest.raises(expected[0], match=expected[1]) as info:
        fake.load("test", download=True, cache_dir=cache, mirror=server.url)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert server.url in str(info.value)
    # The good images file may stay; the bad labels file (or a piece of it) never does.
    left = sorted(p.name for p in (cache / fake.name).iterdir())
    assert left in ([], ["t10k-images-idx3-ubyte.gz"])
    # A later good download fills the gap.
    serve(server, fake, "test")
    assert_split(
        fake.load("test", download=True, cache_dir=cache, mirror=server.url), fake.arrays["test"]
    )


def test_checksum_table_is_complete():
    for name, spec in data._DATASETS.items():
        assert spec.name == name
        assert set(spec.checksums) == {s for pair in data._SPLITS.values() for s in pair}
        for archive, content in spec.checksums.values():
            assert len(archive) == len(content) == 32 and archive != content
            int(archive, 16), int(content, 16)
        assert spec.mirror.endswith("/")


# --------------------------------------------------------------------------------------
# to_tensor32 and the embedded subset
# --------------------------------------------------------------------------------------


def test_to_tensor32_pads_and_normalises():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    x = to_tensor32(images)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    expected = (images.astype(np.float64) / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30].numpy(), expected, rtol=0, atol=1e-5)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    pad = -FASHION_MNIST_MEAN / FASHION_MNIST_STD  # pixel 0, the background
    assert torch.allclose(x[:, 0][:, border], torch.tensor(pad, dtype=torch.float32))
    assert torch.equal(to_tensor32(torch.from_numpy(images)), x)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 28, 28), np.float32),
        np.zeros((2, 32, 32), np.uint8),
        np.zeros((28, 28), np.uint8),
    ],
    ids=["float", "32x32", "2-d"],
)
def test_to_tensor32_bad_input(bad):
    with pytest.raises(ValueError, match="'images' parameter of to_tensor32"):
        to_tensor32(bad)
    with pytest.raises(TypeError, match="'images'"):
        to_tensor32(bad.tolist())


def embedded_npz() -> dict[str, np.ndarray]:
    asset = resources.files("recon").joinpath("assets", data.EMBEDDED_FILE)
    with resources.as_file(asset) as path, np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_load_embedded():
    x_calib, y_calib, x_eval, y_eval = load_embedded()
    assert x_calib.shape == (1000, 1, 32, 32) and x_eval.shape == (2000, 1, 32, 32)
    assert x_calib.dtype == x_eval.dtype == torch.float32
    assert y_calib.dtype == y_eval.dtype == torch.int64
    assert y_calib.bincount(minlength=10).tolist() == [100] * 10
    assert y_eval.bincount(minlength=10).tolist() == [200] * 10
    raw = embedded_npz()
    assert torch.equal(x_calib, to_tensor32(raw["x_calib"]))
    # Disjoint: by position in the test split, and by pixels (the split has no duplicates).
    assert len(np.union1d(raw["idx_calib"], raw["idx_eval"])) == 3000
    calib_rows = {row.tobytes() for row in raw["x_calib"]}
    assert not any(row.tobytes() in calib_rows for row in raw["x_eval"])
    # Shuffled: a prefix of the calibration set sees every class.
    assert set(y_calib[:100].tolist()) == set(range(10))


DEBIAN = Path(data._DATASETS["fashion-mnist"].system_dir)


@pytest.mark.skipif(
    not (DEBIAN / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_test_split(tmp_path):
    images, labels = load_fashion_mnist("test", cache_dir=tmp_path)  # checksums verified
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    raw = embedded_npz()
    for part in ("calib", "eval"):
        idx = raw[f"idx_{part}"].astype(np.int64)
        np.testing.assert_array_equal(raw[f"x_{part}"], images[idx])
        np.testing.assert_array_equal(raw[f"y_{part}"], labels[idx])
    assert not any(tmp_path.iterdir())
