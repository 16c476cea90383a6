"""Calibration images from a folder of image files, decoded batch by batch.

A user pruning a pretrained ImageNet model has a folder of photos, not a tensor.
:class:`ImageFolderBatches` turns one into an iterable of ``(B, 3, H, W)`` float batches
that :func:`recon.prune` accepts as ``calib``::

    batches = ImageFolderBatches("photos/", batch_size=32, max_images=512)
    result = recon.prune(model, batches, speedup=2.0)
    print(batches.summary())                 # how many were used, skipped, ignored

- The folder is searched recursively (an ImageFolder-style tree of class folders
  works; the labels are ignored). Files are taken by suffix (:data:`IMAGE_SUFFIXES`,
  any case); other files and hidden files and folders (``.name``) are ignored and
  counted.
- Images are decoded only while batches are drawn, ``batch_size`` at a time; the
  iterable never holds more than one batch of decoded images. (``recon.prune`` itself
  keeps every calibration batch as a float tensor while it works: ``3·H·W·4`` bytes
  per image, 0.6 MB at 224×224, so 1,000 images take about 600 MB.)
- A file that cannot be decoded (damaged, not really an image) is skipped and recorded
  in :attr:`ImageFolderBatches.skipped`, or raises ``ValueError`` naming it with
  ``strict=True``.
- With ``max_images`` smaller than the number of files, a seeded random subset is used
  (the first ``max_images`` readable files of a permutation drawn with ``seed``);
  otherwise every file, in sorted path order.
- Preprocessing is ``transform`` (a callable from a PIL image to a ``(3, H, W)`` float
  tensor, e.g. a torchvision weights' ``transforms()``), else
  :func:`imagenet_transform`: resize, center crop ``image_size``, ImageNet mean/std.

Needs Pillow and torchvision (the ``vision`` extra: ``pip install 'recon[vision]'``).
This module sees files and tensors only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "ImageFolderBatches",
    "find_images",
    "imagenet_transform",
    "torchvision_transform",
    "torchvision_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File name suffixes read as images (compared in lower case).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_MISSING_VISION = (
    "Reading a folder of images needs Pillow and torchvision, which come with recon's "
    "'vision' extra: pip install 'recon[vision]'"
)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _vision() -> tuple[Any, Any]:
    """``(PIL.Image, torchvision)``, or an ImportError that names the extra to install."""
    try:
        import torchvision
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"{_MISSING_VISION} ({exc}).") from exc
    return Image, torchvision


def find_images(root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The image files under ``root`` (recursively, sorted) and the other files.

    Hidden files and folders (names starting with ``.``) are counted among the others
    and not searched. Symbolic links to folders are not followed.

    Raises
    ------
    ValueError
        If ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"The image folder must be an existing folder. Got '{root}' instead.")
    images: list[Path] = []
    others: list[Path] = []
    for folder, dirs, files in os.walk(root):
        others.extend(Path(folder, d) for d in dirs if d.startswith("."))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder, name)
            ok = not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
            (images if ok else others).append(path)
    return sorted(images), sorted(others)


def imagenet_transform(image_size: int = 224) -> Callable[[Any], Tensor]:
    """The standard ImageNet evaluation preprocessing, for a crop of ``image_size``.

    Resize the shorter side to ``round(image_size * 256 / 224)`` (bilinear, antialiased),
    center crop ``image_size`` × ``image_size``, scale to [0, 1] and normalise with the
    ImageNet mean and std: what torchvision's classification weights use at 224.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"The 'image_size' must be an int >= 1. Got {image_size!r} instead.")
    _, torchvision = _vision()
    t = torchvision.transforms
    return t.Compose(
        [
            t.Resize(
                round(image_size * 256 / 224),
                interpolation=t.InterpolationMode.BILINEAR,
                antialias=True,
            ),
            t.CenterCrop(image_size),
            t.PILToTensor(),
            t.ConvertImageDtype(torch.float32),
            t.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def torchvision_weights(model_name: str, weights_name: str) -> Any:
    """The torchvision weights enum member ``weights_name`` of model ``model_name``.

    ``weights_name`` is a member name (``DEFAULT``, ``IMAGENET1K_V1``) or a full name
    (``ResNet50_Weights.IMAGENET1K_V2``). Raises ``ValueError`` listing the names
    the model has when it has no such weights. Nothing is downloaded.
    """
    _, torchvision = _vision()
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"The '--model' must name a torchvision model. Got {model_name!r} instead."
        ) from exc
    prefix, _, name = weights_name.rpartition(".")
    try:
        if prefix and prefix != enum.__name__:
            raise KeyError(prefix)  # another model's weights
        return enum[name]
    except KeyError:
        known = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ValueError(
            f"The '--weights' must be an existing file or a torchvision weights name of "
            f"{model_name} ({known}). Got {weights_name!r} instead."
        ) from None


def torchvision_transform(model_name: str, weights_name: str) -> Callable[[Any], Tensor]:
    """The preprocessing that torchvision's weights ``weights_name`` of ``model_name`` expect.

    ``torchvision_transform("resnet50", "IMAGENET1K_V2")`` is
    ``ResNet50_Weights.IMAGENET1K_V2.transforms()`` (resize 232, crop 224, ImageNet
    mean/std). Nothing is downloaded.
    """
    return torchvision_weights(model_name, weights_name).transforms()


class ImageFolderBatches:
    """Calibration batches decoded from the image files under a folder.

    Parameters
    ----------
    root : str or os.PathLike
        The folder; searched recursively (see :func:`find_images`).
    transform : callable, optional
        From an RGB PIL image to a float tensor ``(3, H, W)``, the same shape for
        every image. Default: :func:`imagenet_transform` of ``image_size``.
    image_size : int, default 224
        Crop size of the default transform (ignored when ``transform`` is given).
    batch_size : int, default 64
        Images per batch.
    max_images : int, optional
        Use at most this many images: a seeded random subset when the folder has more.
    seed : int, default 0
        Seed of that subset.
    strict : bool, default False
        Raise ``ValueError`` on the first file that cannot be decoded, instead of
        skipping it.

    Attributes
    ----------
    files : list of Path
        The image files found (sorted).
    others : list of Path
        Files ignored because of their suffix, and hidden files and folders.
    skipped : list of (str, str)
        The files the last iteration could not decode, with the reason.
    used : int
        The images the last iteration yielded.

    Examples
    --------
    >>> import tempfile, PIL.Image
    >>> root = tempfile.mkdtemp()
    >>> for i in range(3):
    ...     PIL.Image.new("RGB", (40, 30), (80 * i, 0, 0)).save(f"{root}/{i}.png")
    >>> batches = ImageFolderBatches(root, image_size=32, batch_size=2)
    >>> [tuple(x.shape) for x in batches]
    [(2, 3, 32, 32), (1, 3, 32, 32)]
    >>> batches.summary().startswith("3 images")
    True
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Callable[[Any], Tensor] | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        max_images: int | None = None,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"The '{name}' must be an int >= {low}. Got {value!r} instead.")
        if max_images is not None and (
            isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1
        ):
            raise ValueError(f"The 'max_images' must be an int >= 1. Got {max_images!r} instead.")
        if transform is not None and not callable(transform):
            raise TypeError(
                "The 'transform' must be a callable from a PIL image to a tensor. "
                f"Got {type(transform).__name__} instead."
            )
        self._image, _ = _vision()
        self.root = Path(root)
        self.files, self.others = find_images(self.root)
        if not self.files:
            raise ValueError(
                f"The image folder '{self.root}' holds no image files (searched recursively "
                f"for {', '.join(sorted(IMAGE_SUFFIXES))}). Got {len(self.others)} other "
                "files."
            )
        self.transform = transform if transform is not None else imagenet_transform(image_size)
        self.batch_size = batch_size
        self.max_images = max_images
        self.seed = seed
        self.strict = strict
        self.skipped: list[tuple[str, str]] = []
        self.used = 0

    def order(self) -> list[Path]:
        """The files in the order they are read: sorted, or seeded-permuted when subsetting."""
        if self.max_images is None or self.max_images >= len(self.files):
            return list(self.files)
        perm = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(self.seed))
        return [self.files[i] for i in perm.tolist()]

    def __iter__(self) -> Iterator[Tensor]:
        self.skipped, self.used = [], 0
        batch: list[Tensor] = []
        shape: tuple[int, ...] | None = None
        for path in self.order():
            if self.max_images is not None and self.used >= self.max_images:
                break
            x = self._decode(path)  # (3, H, W), or None when skipped
            if x is None:
                continue
            if shape is None:
                shape = tuple(x.shape)
            elif tuple(x.shape) != shape:
                raise ValueError(
                    f"The image transform must give every image the same shape: '{path}' "
                    f"gave {tuple(x.shape)}, earlier images {shape}."
                )
            batch.append(x)
            self.used += 1
            if len(batch) == self.batch_size:
                yield torch.stack(batch)  # (B, 3, H, W)
                batch = []
        if batch:
            yield torch.stack(batch)
        if self.used == 0:
            raise ValueError(
                f"The image folder '{self.root}' holds no readable image: all "
                f"{len(self.skipped)} image files failed to decode (first: "
                f"'{self.skipped[0][0]}': {self.skipped[0][1]})."
            )

    def _decode(self, path: Path) -> Tensor | None:
        try:
            with self._image.open(path) as img:
                rgb = img.convert("RGB")  # decodes the whole file
            x = self.transform(rgb)
        except Exception as exc:  # PIL raises many kinds on damaged files
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            if self.strict:
                raise ValueError(
                    f"The image file '{path}' cannot be decoded ({reason}). Remove it, or "
                    "skip unreadable files (without --strict / with strict=False)."
                ) from exc
            self.skipped.append((str(path), reason))
            return None
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise ValueError(
                f"The image transform must return a float tensor (C, H, W). Got "
                f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))} for '{path}'."
            )
        return x

    def summary(self) -> str:
        """One line: images used, files skipped (with the first few reasons), files ignored."""
        text = f"{self.used} images from '{self.root}'"
        if self.max_images is not None and self.max_images < len(self.files):
            text += f" (a random subset of {len(self.files)}, seed {self.seed})"
        if self.skipped:
            shown = "; ".join(f"'{p}' ({why})" for p, why in self.skipped[:3])
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            text += f"; {_count(len(self.skipped), 'unreadable file')} skipped: {shown}{more}"
        if self.others:
            text += f"; {_count(len(self.others), 'other file')} ignored (not images, or hidden)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-safe data (for reports)."""
        return {
            "folder": str(self.root),
            "images": self.used,
            "image_files": len(self.files),
            "max_images": self.max_images,
            "seed": self.seed,
            "skipped": [{"file": p, "reason": why} for p, why in self.skipped],
            "ignored": len(self.others),
        }
