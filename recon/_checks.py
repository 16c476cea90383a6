"""Argument checks of :func:`recon.prune` (every one runs before any calibration work),
and the few shared by the model builders of :mod:`recon.models` and
:mod:`recon.mobilenet`.

Messages follow one pattern, naming the argument, the expectation and the value:
``The 'seed' argument must be an int >= 0. Got -1 instead.``
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as _dist
from .graph import Graph
from .select import METHODS
from .solve import RECONSTRUCT


def _bad(name: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"The '{name}' argument must be {expected}. Got {got!r} instead.")


def _check_args(method, reconstruct, samples_per_image, max_images, seed, round_to) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise _bad("method", f"one of {METHODS}", method)
    if not isinstance(reconstruct, str) or reconstruct not in RECONSTRUCT:
        raise _bad("reconstruct", f"one of {RECONSTRUCT}", reconstruct)
    if samples_per_image is not None:
        if isinstance(samples_per_image, bool) or not isinstance(samples_per_image, int):
            raise TypeError(
                "The 'samples_per_image' argument must be an int >= 1 or None. "
                f"Got {samples_per_image!r} instead."
            )
        if samples_per_image < 1:
            raise _bad("samples_per_image", "an int >= 1 or None", samples_per_image)
    if max_images is not None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise _bad("max_images", "an int >= 1 or None", max_images)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _bad("seed", "an int >= 0", seed)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise _bad("round_to", "an int >= 1", round_to)


def _finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite (a float64 sum propagates NaN and inf)."""
    return bool(torch.isfinite(t.detach().sum(dtype=torch.float64)))


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be a torch.nn.Module. Got {type(model).__name__} instead."
        )
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(
                f"The 'model' argument has '{name}' on the meta device (no values); "
                "load its weights before pruning."
            )
        if t.is_floating_point() and not _finite(t):
            raise ValueError(
                f"The 'model' argument has non-finite values (NaN or inf) in '{name}'; "
                "recon cannot prune a model with broken weights."
            )


#: Keys tried, in order, for the images of a dict batch when ``input_key`` is None and
#: the dict holds more than one array (Hugging Face image processors use "pixel_values").
INPUT_KEYS = ("image", "pixel_values", "images", "inputs", "input")


def _array(value: Any) -> Tensor | None:
    """A tensor, or a numpy array as a tensor (sharing its memory); else None."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":  # not numbers (strings, objects, complex)
            return None
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def _from_dict(item: Mapping, i: int, input_key: str | None) -> Any:
    """The images of a dict batch: ``item[input_key]``, the only array it holds, or the
    first of :data:`INPUT_KEYS` it has."""
    if input_key is not None:
        if input_key not in item:
            raise ValueError(
                f"The 'calib' argument's item {i} is a dict without the 'input_key' "
                f"{input_key!r}. Got keys {sorted(map(str, item))} instead."
            )
        return item[input_key]
    arrays = [k for k, v in item.items() if _array(v) is not None]
    if len(arrays) == 1:
        return item[arrays[0]]
    for key in INPUT_KEYS:
        if key in item:
            return item[key]
    raise ValueError(
        f"The 'calib' argument's item {i} is a dict with {len(arrays)} arrays "
        f"({sorted(map(str, arrays))}) and none of the keys {INPUT_KEYS}: pass "
        "input_key= to say which holds the images."
    )


def _calibration_batches(
    calib: Any, max_images: int | None, input_key: str | None = None
) -> list[Tensor]:
    """The calibration inputs as batches (as given, not moved or cast), no labels.

    ``calib`` is a tensor or numpy array (N, C, H, W), a dict batch, or an iterable of
    such batches or of ``(inputs, labels)`` tuples; a dict batch gives its images by
    ``input_key`` (see :func:`_from_dict`). Numpy arrays become tensors.
    """
    if input_key is not None and not isinstance(input_key, str):
        raise TypeError(
            f"The 'input_key' argument must be a str or None. Got {type(input_key).__name__} "
            "instead."
        )
    if isinstance(calib, Tensor | np.ndarray | Mapping):
        items: Iterable[Any] = [calib]
    elif isinstance(calib, str | bytes) or not isinstance(calib, Iterable):
        raise TypeError(
            "The 'calib' argument must be a tensor or numpy array, a dict batch, or an "
            "iterable (e.g. a DataLoader) of those or of (inputs, labels) tuples. Got "
            f"{type(calib).__name__} instead."
        )
    else:
        items = calib
    batches: list[Tensor] = []
    seen = 0
    for i, item in enumerate(items):
        x = item[0] if isinstance(item, tuple | list) and len(item) > 0 else item
        if isinstance(x, Mapping):
            x = _from_dict(x, i, input_key)
        x = _array(x)
        if x is None:
            raise TypeError(
                f"The 'calib' argument's item {i} must be a tensor, a numpy array, a dict "
                f"batch or an (inputs, labels) tuple. Got {type(item).__name__} instead."
            )
        if x.dim() < 2 or not x.is_floating_point():
            raise ValueError(
                f"The 'calib' argument's item {i} must be a floating-point batch of shape "
                f"(N, C, H, W). Got a {x.dtype} tensor of shape {tuple(x.shape)} instead."
            )
        if batches and x.shape[1:] != batches[0].shape[1:]:
            raise ValueError(
                f"The 'calib' argument's batches must all have the same per-image shape. "
                f"Got {tuple(batches[0].shape[1:])} and then {tuple(x.shape[1:])} (item {i})."
            )
        if not _finite(x):
            raise ValueError(
                f"The 'calib' argument's item {i} contains non-finite values (NaN or inf)."
            )
        if max_images is not None:
            x = x[: max_images - seen]
        if len(x):
            batches.append(x)
            seen += len(x)
        if max_images is not None and seen >= max_images:
            break
    if not batches:
        raise ValueError("The 'calib' argument must contain at least one image. Got no images.")
    return batches


def _shard(
    batches: list[Tensor], ctx: _dist.Context | None, sharded: bool, max_images: int | None
) -> tuple[list[Tensor], list[int]]:
    """This process's calibration batches and the global index of each one's first image.

    In one process that is every batch. In a distributed run either every rank was given
    the same images (``sharded=False``: they are checked to be the same, and rank ``r``
    keeps the ``r``-th of ``world`` contiguous parts), or each rank its own part
    (``sharded=True``: images are numbered rank by rank, ``max_images`` counts them all).
    """
    sizes = [b.shape[0] for b in batches]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    if ctx is None:
        return batches, starts
    if sharded:
        counts = [c[0] for c in ctx.gather_ints([total], "counting calibration images")]
        first = sum(counts[: ctx.rank])
        total = sum(counts)
        if max_images is not None:
            total = min(total, max_images)
        lo, hi = first, min(first + sum(sizes), total)
    else:
        acc = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            d = b.double()  # one float64 copy per batch, not two
            acc += torch.stack([d.sum(), d.square().sum()]).cpu()
        if not ctx.same([total, *acc.tolist()], "comparing calibration data"):
            raise ValueError(
                "The 'calib' argument differs between the processes of this distributed run. "
                "Give every rank the same images (recon splits them), or pass "
                "calib_sharded=True when each rank's loader yields its own part (e.g. "
                "with a DistributedSampler)."
            )
        lo, hi = _dist.shard_range(total, ctx.rank, ctx.world)
        first = 0
    mine, offsets = [], []
    for b, start in zip(batches, starts, strict=True):
        s = first + start  # global index of the batch's first image
        a, z = max(lo, s), min(hi, s + b.shape[0])
        if a < z:
            mine.append(b[a - s : z - s])
            offsets.append(a)
    return mine, offsets


def _fingerprint(model: nn.Module) -> list[float]:
    """A few float64 sums of the model's tensors: equal models give equal numbers."""
    total = torch.zeros(3, dtype=torch.float64)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            d = t.detach().double()
            total += torch.stack([d.sum(), d.square().sum(), torch.tensor(float(d.numel()))])
    return total.tolist()


def _check_layer_names(graph: Graph, **named: Any) -> None:
    """Give the reason when a named layer exists but is not a prunable unit."""
    for arg, value in named.items():
        if value is None or isinstance(value, int | float):
            continue
        names = [value] if isinstance(value, str) else list(value)
        for n in names:
            if n in graph.skipped:
                raise ValueError(
                    f"The '{arg}' argument names layer '{n}', which recon cannot prune: "
                    f"{graph.skipped[n]}."
                )


# Arguments of the model builders (recon.models, recon.mobilenet)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"The {name!r} parameter must be an int >= 1. Got {value!r} instead.")
    return value


def _check_width(owner: str, width: object) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(
            f"The 'width' parameter of {owner} must be a float in (0, inf). Got {width!r} instead."
        )
    return float(width)
