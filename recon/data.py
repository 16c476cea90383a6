"""Data: an IDX reader, (Fashion-)MNIST loaders, the embedded Fashion-MNIST subset,
scikit-learn's digits split and a top-1 accuracy evaluator.

Real data comes from IDX files (the MNIST format). :func:`load_fashion_mnist` and
:func:`load_mnist` look for them, in order, in ``data_dir``; else (Fashion-MNIST only)
in the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
else in the cache (``$RECON_CACHE/<dataset>`` or ``~/.cache/recon/<dataset>``); else,
only with ``download=True``, they download the official files into the cache. Every
file is checked against the MD5 of the official release, so whatever the source, the
arrays are the published data set.

Offline and without any download, :func:`load_embedded` returns a fixed, class-balanced
subset of the Fashion-MNIST test split (1,000 calibration and 2,000 evaluation images)
shipped in ``recon/assets/fmnist_subset.npz`` and built by ``scripts/make_embedded.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import model_device

__all__ = [
    "EMBEDDED_FILE",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_MIRROR",
    "FASHION_MNIST_STD",
    "MNIST_MIRROR",
    "evaluate",
    "load_digits_split",
    "load_embedded",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "to_tensor32",
]

#: Official download locations (base URLs; the file names are appended).
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"

# Pixel statistics of the 60,000 Fashion-MNIST *training* images, 28x28, pixels scaled
# to [0, 1], over all 47,040,000 pixels (population std), computed once in float64:
#   x = read_idx("train-images-idx3-ubyte.gz").astype(np.float64) / 255
#   x.mean() = 0.2860405969887955, x.std() = 0.35302424451492254
FASHION_MNIST_MEAN = 0.2860405969887955
FASHION_MNIST_STD = 0.35302424451492254

#: File name of the embedded subset inside ``recon/assets``.
EMBEDDED_FILE = "fmnist_subset.npz"

# Same variable as recon._default.CACHE_ENV (which imports this module, so no import back).
_CACHE_ENV = "RECON_CACHE"
_DOWNLOAD_TIMEOUT_S = 60.0

# IDX type codes (third byte of the magic number); multi-byte types are big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class _DatasetSpec:
    """Where a data set of four IDX files lives and what its files must hash to.

    ``checksums`` maps each file stem (``"t10k-images-idx3-ubyte"``) to a pair
    ``(archive_md5, content_md5)``: the MD5 of the official ``.gz`` file (checked on
    download, before anything is written to the cache) and the MD5 of the decompressed
    IDX content (checked on every load, so a re-compressed or gunzipped copy, such
    as the Debian package's, is accepted if and only if its data are the official ones).
    """

    name: str  # sub-directory of the cache
    title: str  # for messages
    mirror: str
    system_dir: str | None  # where a distribution package installs the files
    apt_package: str | None
    checksums: dict[str, tuple[str, str]]


# Archive MD5s: torchvision/datasets/mnist.py (= the Fashion-MNIST README). Content MD5s:
# the md5sum of the gunzipped official files, as published by several independent
# projects (e.g. PyTorch's MNIST download scripts); the Debian package's files are
# re-compressed (their .gz MD5s differ) but decompress to exactly these contents.
_DATASETS: dict[str, _DatasetSpec] = {
    "fashion-mnist": _DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        mirror=FASHION_MNIST_MIRROR,
        system_dir="/usr/share/datasets/fashion-mnist",
        apt_package="dataset-fashion-mnist",
        checksums={
            "train-images-idx3-ubyte": (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            ),
            "train-labels-idx1-ubyte": (
                "25c81989df183df01b3e8a0aad5dffbe",
                "9018921c3c673c538a1fc5bad174d6f9",
            ),
            "t10k-images-idx3-ubyte": (
                "bef4ecab320f06d8554ea6380940ec79",
                "8181f5470baa50b63fa0f6fddb340f0a",
            ),
            "t10k-labels-idx1-ubyte": (
                "bb300cfdad3c16e7a12a480ee83cd310",
                "15d484375f8d13e6eb1aabb0c3f46965",
            ),
        },
    ),
    "mnist": _DatasetSpec(
        name="mnist",
        title="MNIST",
        mirror=MNIST_MIRROR,
        system_dir=None,
        apt_package=None,
        checksums={
            "train-images-idx3-ubyte": (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "6bbc9ace898e44ae57da46a324031adb",
            ),
            "train-labels-idx1-ubyte": (
                "d53e105ee54ea40749a09fcbcd1e9432",
                "a25bea736e30d166cdddb491f175f624",
            ),
            "t10k-images-idx3-ubyte": (
                "9fb629c4189551a2d022fa330f9573f3",
                "2646ac647ad5339dbf082846283269ea",
            ),
            "t10k-labels-idx1-ubyte": (
                "ec29112dd5afa0611ce80d1b7f02629c",
                "27ae3e4e09519cfbb04c329615203637",
            ),
        },
    ),
}


# --------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _read_bytes(path: Path) -> bytes:
    """The IDX content of ``path``, gunzipped if it is gzip-compressed (by its magic)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(
                f"The IDX file {str(path)!r} is not a valid gzip stream ({exc}); "
                f"it is probably truncated or corrupt."
            ) from exc
    return data


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Array of an IDX byte string; ``path`` only names the file in errors."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"The file {str(path)!r} is not an IDX file: its magic number must start with "
            f"two zero bytes. Got {data[:4].hex(' ') or 'an empty file'} instead."
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"The IDX file {str(path)!r} has an unknown type code 0x{code:02x}; expected one "
            f"of {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}."
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"The IDX file {str(path)!r} is truncated: its header declares {ndim} dimensions "
            f"({header} bytes) but the file has {len(data)} bytes."
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    count = math.prod(dims)
    expected, got = count * dtype.itemsize, len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "longer than its header says"
        raise ValueError(
            f"The IDX file {str(path)!r} is {what}: shape {dims} of {dtype.name} needs "
            f"{expected} bytes of data, got {got}."
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a native-endian, writable copy


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw.

    The header is a magic number ``0x00 0x00 <type code> <ndim>`` followed by ``ndim``
    big-endian uint32 dimensions, then the data in C order. Compression is detected
    from the content (gzip's magic bytes), not from the file name.

    Parameters
    ----------
    path : str or path-like
        The file, e.g. ``t10k-images-idx3-ubyte.gz``.

    Returns
    -------
    ndarray
        Array of the shape the header declares and its type in native byte order:
        type code 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
        0x0E float64. The array owns its (writable) memory.

    Raises
    ------
    ValueError
        Naming the file, if the magic number or type code is invalid, the gzip stream
        is broken, or the data are shorter or longer than the header declares.
    FileNotFoundError
        If ``path`` does not exist.

    Examples
    --------
    >>> import gzip, os, tempfile
    >>> from recon.data import read_idx
    >>> raw = bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9])  # uint8 vector [7, 8, 9]
    >>> path = os.path.join(tempfile.mkdtemp(), "v-idx1-ubyte.gz")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(gzip.compress(raw))
    >>> read_idx(path)
    array([7, 8, 9], dtype=uint8)
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


# --------------------------------------------------------------------------------------
# (Fashion-)MNIST: finding, verifying and downloading the files
# --------------------------------------------------------------------------------------


def _find(directory: Path, stem: str) -> Path | None:
    """``<stem>.gz`` or ``<stem>`` in ``directory``, whichever exists first."""
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "recon"


def _download(url: str, dest: Path, archive_md5: str) -> None:
    """Download ``url`` to ``dest`` atomically, only if its MD5 is ``archive_md5``.

    The bytes go to a temporary file next to ``dest`` that is renamed into place only
    after the transfer is complete and verified; on any failure it is removed, so the
    cache never holds a partial or wrong file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    declared = response.headers.get("Content-Length")
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
            except (OSError, http.client.HTTPException) as exc:
                raise OSError(f"Downloading {url} failed ({exc}); nothing was cached.") from exc
        if declared is not None and received != int(declared):
            raise OSError(
                f"Downloading {url} failed: the transfer is truncated ({received} of "
                f"{declared} bytes); nothing was cached."
            )
        if digest.hexdigest() != archive_md5:
            raise ValueError(
                f"The file downloaded from {url} has MD5 {digest.hexdigest()}, expected "
                f"{archive_md5}: it is corrupt or not the official file; nothing was cached."
            )
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_verified(path: Path, content_md5: str, spec: _DatasetSpec) -> np.ndarray:
    data = _read_bytes(path)
    got = _md5(data)
    if got != content_md5:
        raise ValueError(
            f"The file {str(path)!r} is not the official {spec.title} file: the MD5 of its "
            f"decompressed content is {got}, expected {content_md5}. Delete or replace it."
        )
    return _parse_idx(data, path)


def _not_found(spec: _DatasetSpec, split: str, searched: list[Path], mirror: str) -> str:
    stems = ", ".join(f"{s}[.gz]" for s in _SPLITS[split])
    ways = ["pass data_dir=... (--data-dir on the command line) naming a folder with them"]
    if spec.apt_package:
        ways.append(f"install them with `apt-get install {spec.apt_package}`")
    ways.append(f"pass download=True to fetch them from {mirror} into the cache")
    return (
        f"The {spec.title} {split} split was not found: looked for {stems} in "
        f"{' and '.join(repr(str(d)) for d in searched)}. To get it, "
        f"{'; or '.join(ways)}."
    )


def _load(
    spec: _DatasetSpec,
    split: str,
    data_dir: str | os.PathLike[str] | None,
    download: bool,
    cache_dir: str | os.PathLike[str] | None,
    mirror: str | None,
    caller: str,
) -> tuple[np.ndarray, np.ndarray]:
    if split not in _SPLITS:
        raise ValueError(
            f"The 'split' parameter of {caller} must be 'train' or 'test'. Got {split!r} instead."
        )
    stems = _SPLITS[split]
    mirror = spec.mirror if mirror is None else mirror
    if not mirror.endswith("/"):
        mirror += "/"

    if data_dir is not None:
        directory = Path(data_dir)
        found = {s: _find(directory, s) for s in stems}
        missing = [f"{s}[.gz]" for s, p in found.items() if p is None]
        if missing:
            raise FileNotFoundError(
                f"The 'data_dir' parameter of {caller} names {str(directory)!r}, which has no "
                f"{' and no '.join(missing)} for the {spec.title} {split} split."
            )
    else:
        cache = _cache_root(cache_dir) / spec.name
        searched = [Path(spec.system_dir)] if spec.system_dir else []
        searched.append(cache)
        found = {}
        for s in stems:  # each file from the first place that has it
            found[s] = next((p for d in searched if (p := _find(d, s)) is not None), None)
        missing = [s for s, p in found.items() if p is None]
        if missing and not download:
            raise FileNotFoundError(_not_found(spec, split, searched, mirror))
        for s in missing:
            _download(mirror + f"{s}.gz", cache / f"{s}.gz", spec.checksums[s][0])
            found[s] = cache / f"{s}.gz"

    images_path, labels_path = (found[s] for s in stems)
    images = _read_verified(images_path, spec.checksums[stems[0]][1], spec)
    labels = _read_verified(labels_path, spec.checksums[stems[1]][1], spec)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"The images file {str(images_path)!r} must hold uint8 images of shape "
            f"(N, 28, 28). Got {images.dtype} of shape {images.shape} instead."
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"The labels file {str(labels_path)!r} must hold one label per image "
            f"({len(images)}). Got shape {labels.shape} instead."
        )
    return images, labels.astype(np.int64)


def load_fashion_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels of one split, as numpy arrays.

    Looks for the IDX files ``train-images-idx3-ubyte[.gz]`` and
    ``train-labels-idx1-ubyte[.gz]`` (``t10k-...`` for the test split), in this order:

    1. ``data_dir``, if given, and nowhere else (missing files there are an error);
    2. the Debian package's folder ``/usr/share/datasets/fashion-mnist``
       (``apt-get install dataset-fashion-mnist``);
    3. the cache, ``<cache root>/fashion-mnist``;
    4. only if ``download=True``: the official files, from ``mirror`` into the cache.

    Each file is looked up on its own, so a cache holding one of the two is completed
    by downloading the other.

    Every file is verified, wherever it comes from: a download must match the MD5 of
    the official ``.gz`` archive before it is (atomically) renamed into the cache, and
    every file read must decompress to the official IDX content (its MD5). A
    re-compressed or gunzipped copy, like the Debian package's, is thus accepted, but
    any other data is not.

    Parameters
    ----------
    split : {"train", "test"}, default="train"
        The 60,000 training or the 10,000 test images.
    data_dir : str or path-like, optional
        Folder holding the IDX files, gzip-compressed or not.
    download : bool, default=False
        Download the files found nowhere else into the cache.
    cache_dir : str or path-like, optional
        Root of the cache; the files live in its ``fashion-mnist`` sub-folder. Defaults
        to the ``RECON_CACHE`` environment variable, else ``~/.cache/recon``.
    mirror : str, optional
        Base URL to download from; default :data:`FASHION_MNIST_MIRROR`, the official
        ``http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/``.

    Returns
    -------
    images : ndarray of shape (N, 28, 28), uint8
        Raw pixels, 0 (background) to 255; :func:`to_tensor32` makes network inputs.
    labels : ndarray of shape (N,), int64
        Class labels in 0..9 (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal,
        Shirt, Sneaker, Bag, Ankle boot).

    Raises
    ------
    FileNotFoundError
        If the files are in none of the places (the message says where it looked and
        how to get them), or if ``data_dir`` lacks them.
    ValueError
        If a file is not the official one (checksum) or not a valid IDX file, or if
        ``split`` is invalid.
    OSError
        If a download fails or is truncated; nothing is then left in the cache.

    Examples
    --------
    >>> from recon.data import load_fashion_mnist, to_tensor32
    >>> images, labels = load_fashion_mnist("test")  # doctest: +SKIP
    >>> images.shape, labels.shape  # doctest: +SKIP
    ((10000, 28, 28), (10000,))
    >>> to_tensor32(images).shape  # doctest: +SKIP
    torch.Size([10000, 1, 32, 32])
    """
    return _load(
        _DATASETS["fashion-mnist"],
        split,
        data_dir,
        download,
        cache_dir,
        mirror,
        "load_fashion_mnist",
    )


def load_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images and labels of one split, as numpy arrays.

    The same as :func:`load_fashion_mnist` (same file names, search order, checks and
    return values), for the MNIST handwritten digits, except that no distribution
    package ships MNIST: the files come from ``data_dir``, else the cache
    (``<cache root>/mnist``), else, with ``download=True``, from ``mirror``.

    Parameters
    ----------
    split : {"train", "test"}, default="train"
        The 60,000 training or the 10,000 test images.
    data_dir : str or path-like, optional
        Folder holding the IDX files, gzip-compressed or not.
    download : bool, default=False
        Download the files found nowhere else into the cache.
    cache_dir : str or path-like, optional
        Root of the cache; the files live in its ``mnist`` sub-folder. Defaults to the
        ``RECON_CACHE`` environment variable, else ``~/.cache/recon``.
    mirror : str, optional
        Base URL to download from; default :data:`MNIST_MIRROR`, PyTorch's official
        copy ``https://ossci-datasets.s3.amazonaws.com/mnist/``.

    Returns
    -------
    images : ndarray of shape (N, 28, 28), uint8
        Raw pixels, 0 (background) to 255.
    labels : ndarray of shape (N,), int64
        Digit labels in 0..9.

    Raises
    ------
    FileNotFoundError
        If the files are found nowhere, or if ``data_dir`` lacks them.
    ValueError
        If a file is not the official one or not a valid IDX file.
    OSError
        If a download fails or is truncated; nothing is then left in the cache.
    """
    return _load(_DATASETS["mnist"], split, data_dir, download, cache_dir, mirror, "load_mnist")


# --------------------------------------------------------------------------------------
# Network input and the embedded subset
# --------------------------------------------------------------------------------------


def to_tensor32(images: np.ndarray | Tensor) -> Tensor:
    """Raw 28x28 images to normalised 32x32 float32 network input.

    Each image is zero-padded by 2 pixels on every side (pixel value 0, the
    background), scaled to [0, 1] and standardised with the fixed Fashion-MNIST
    training-set statistics :data:`FASHION_MNIST_MEAN` and :data:`FASHION_MNIST_STD`:
    ``x = (pixel / 255 - mean) / std``. Padding pixels thus become
    ``-mean / std`` (about -0.81). The same constants are used for every split and
    for MNIST, so inputs never depend on the batch.

    Parameters
    ----------
    images : ndarray or Tensor of shape (N, 28, 28), uint8
        Raw pixels, as returned by :func:`load_fashion_mnist`.

    Returns
    -------
    Tensor of shape (N, 1, 32, 32), float32
        On the CPU (or the input tensor's device).

    Examples
    --------
    >>> import numpy as np
    >>> from recon.data import to_tensor32
    >>> x = to_tensor32(np.full((2, 28, 28), 255, dtype=np.uint8))
    >>> tuple(x.shape), x.dtype
    ((2, 1, 32, 32), torch.float32)
    >>> round(x[0, 0, 0, 0].item(), 4), round(x[0, 0, 2, 2].item(), 4)
    (-0.8103, 2.0224)
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise TypeError(
            f"The 'images' parameter of to_tensor32 must be a numpy array or a Tensor. "
            f"Got {type(images).__name__} instead."
        )
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(
            f"The 'images' parameter of to_tensor32 must be uint8 of shape (N, 28, 28). "
            f"Got {images.dtype} of shape {tuple(images.shape)} instead."
        )
    x = images.to(torch.float32).div_(255.0)  # (N, 28, 28) in [0, 1]
    x = F.pad(x, (2, 2, 2, 2))  # (N, 32, 32), background 0
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x.unsqueeze(1)  # (N, 1, 32, 32)


def load_embedded() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The embedded Fashion-MNIST subset: calibration and evaluation sets, offline.

    A fixed subset of the Fashion-MNIST *test* split shipped with the package
    (``recon/assets/fmnist_subset.npz``, written by ``scripts/make_embedded.py`` with
    seed 0): 1,000 calibration images (100 per class) and 2,000 evaluation images
    (200 per class), disjoint, each set in a seeded random order. Images go through
    :func:`to_tensor32`. The file also stores the positions of the images in the
    test split (``idx_calib``, ``idx_eval``).

    Returns
    -------
    x_calib : Tensor of shape (1000, 1, 32, 32), float32
    y_calib : Tensor of shape (1000,), int64
    x_eval : Tensor of shape (2000, 1, 32, 32), float32
    y_eval : Tensor of shape (2000,), int64

    Raises
    ------
    FileNotFoundError
        If the package was installed without its data file.

    Examples
    --------
    >>> from recon.data import load_embedded
    >>> x_calib, y_calib, x_eval, y_eval = load_embedded()
    >>> tuple(x_calib.shape), tuple(x_eval.shape), y_eval.bincount().tolist()[:3]
    ((1000, 1, 32, 32), (2000, 1, 32, 32), [200, 200, 200])
    """
    asset = resources.files("recon").joinpath("assets", EMBEDDED_FILE)
    try:
        raw = asset.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileNotFoundError(
            f"The embedded data file recon/assets/{EMBEDDED_FILE} is missing: the package "
            f"was installed without its data; reinstall it, or run scripts/make_embedded.py "
            f"in a source checkout."
        ) from exc
    with np.load(io.BytesIO(raw)) as z:
        arrays = {k: z[k] for k in ("x_calib", "y_calib", "x_eval", "y_eval")}
    return (
        to_tensor32(arrays["x_calib"]),
        torch.from_numpy(arrays["y_calib"].astype(np.int64)),
        to_tensor32(arrays["x_eval"]),
        torch.from_numpy(arrays["y_eval"].astype(np.int64)),
    )


# --------------------------------------------------------------------------------------
# scikit-learn digits and evaluation
# --------------------------------------------------------------------------------------


def load_digits_split(
    *, seed: int = 0, test_fraction: float = 0.3
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scikit-learn's 8x8 digits as normalised image tensors, split train/test.

    Pixels (0..16) are scaled to [0, 1], then standardised with the mean and standard
    deviation (two scalars) of the *training* split, so the test split sees no
    statistics of its own. The split is stratified by label and seeded.

    Parameters
    ----------
    seed : int, default=0
        Seed of the split; the same seed always gives the same tensors.
    test_fraction : float, default=0.3
        Fraction of the 1797 images held out for testing, in (0, 1).

    Returns
    -------
    x_train : Tensor of shape (n_train, 1, 8, 8), float32
    y_train : Tensor of shape (n_train,), int64
    x_test : Tensor of shape (n_test, 1, 8, 8), float32
    y_test : Tensor of shape (n_test,), int64

    Examples
    --------
    >>> from recon.data import load_digits_split
    >>> x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    >>> tuple(x_train.shape), tuple(x_test.shape)
    ((1257, 1, 8, 8), (540, 1, 8, 8))
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"The 'seed' parameter of load_digits_split must be an int. Got {seed!r} instead."
        )
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0 < test_fraction < 1
    ):
        raise ValueError(
            f"The 'test_fraction' parameter of load_digits_split must be a float in (0, 1). "
            f"Got {test_fraction!r} instead."
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / np.float32(16.0)  # (N, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=int(seed), stratify=labels
    )
    mean = x_tr.mean(dtype=np.float64)
    std = x_tr.std(dtype=np.float64)

    def to_tensor(x: np.ndarray) -> Tensor:
        x = ((x - mean) / std).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)  # (N, 1, 8, 8)

    return (
        to_tensor(x_tr),
        torch.from_numpy(np.ascontiguousarray(y_tr)),
        to_tensor(x_te),
        torch.from_numpy(np.ascontiguousarray(y_te)),
    )


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``.

    The model is put in eval mode under ``torch.inference_mode()`` and the previous
    train/eval mode of each of its submodules is restored afterwards. Batches are
    moved to the model's device.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits of shape (batch, num_classes).
    x : Tensor of shape (N, ...)
        Inputs.
    y : Tensor of shape (N,)
        Integer class labels.
    batch_size : int, default=256
        Images per forward pass.

    Returns
    -------
    float
        Fraction of correctly classified samples, in [0, 1].
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' parameter of evaluate must be an nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"The 'x' and 'y' parameters of evaluate must be Tensors. "
            f"Got {type(x).__name__} and {type(y).__name__} instead."
        )
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"The 'y' parameter of evaluate must have shape (N,) with N = len(x) = {len(x)}. "
            f"Got shape {tuple(y.shape)} instead."
        )
    if len(y) == 0:
        raise ValueError("The 'x' parameter of evaluate must hold at least one sample. Got 0.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"The 'batch_size' parameter of evaluate must be an int >= 1. "
            f"Got {batch_size!r} instead."
        )
    device = model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device)
                pred = model(xb).argmax(dim=1)  # (B,)
                correct += int((pred == yb).sum())
    finally:
        for m, training in modes:
            m.training = training
    return correct / len(y)
