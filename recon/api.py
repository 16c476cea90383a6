"""``recon.prune``: argument checks, planning, and the per-layer loop.

This is the one module that knows every stage: it finds units in the graph
(:mod:`recon.graph`), turns the target into channel counts (:mod:`recon.budget`), and
for each unit in forward order accumulates statistics (:mod:`recon.stats`,
:mod:`recon.sampling`), selects channels (:mod:`recon.select`), re-fits the consumer
(:mod:`recon.solve`) and cuts the channels out (:mod:`recon.surgery`).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import budget as _budget
from ._utils import model_device, model_dtype
from .graph import Graph, Unit, find_units
from .report import LayerReport, Report
from .sampling import _mix, gather_patches, gather_targets, layer_key, sample_positions
from .select import METHODS, select_channels
from .solve import RECONSTRUCT, channel_error, lstsq, patch_error, scale
from .stats import ChannelStats, PatchStats
from .surgery import prune_unit

__all__ = ["MAX_PATCH_DIM", "PruneResult", "prune"]

#: Consumers whose patch length ``c*k`` exceeds this use channel-level statistics
#: (a ``c × c`` Gram) instead of a ``(c*k)²`` patch Gram; ``lstsq`` then becomes ``scale``.
MAX_PATCH_DIM = 6144
_ROWS_PER_UPDATE = 4096  # bound the float64 copy of a batch's patches


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes
    ----------
    model : nn.Module
        The pruned network (a new module unless ``inplace=True``).
    report : Report
        Per-layer errors and timings, FLOPs and parameters before and after.
    channels : dict of str to int
        Channels kept per unit (unit = producer layer name).
    kept : dict of str to list of int
        Indices of the kept channels per unit, in the original numbering.
    """

    model: nn.Module
    report: Report
    channels: dict[str, int] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by a hook once the values it needs are captured: skips the rest of forward."""


# --------------------------------------------------------------------------- checks


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
        if t.is_floating_point() and not _finite(t):
            raise ValueError(
                f"The 'model' argument has non-finite values (NaN or inf) in '{name}'; "
                "recon cannot prune a model with broken weights."
            )


def _calibration_batches(
    calib: Any, max_images: int | None, device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    """The calibration inputs as batches on ``device`` in the model's ``dtype``, no labels."""
    if isinstance(calib, Tensor):
        items: Iterable[Any] = [calib]
    elif isinstance(calib, str | bytes | Mapping) or not isinstance(calib, Iterable):
        raise TypeError(
            "The 'calib' argument must be a tensor, or an iterable (e.g. a DataLoader) of "
            f"tensors or (inputs, labels) tuples. Got {type(calib).__name__} instead."
        )
    else:
        items = calib
    batches: list[Tensor] = []
    seen = 0
    for i, item in enumerate(items):
        x = item[0] if isinstance(item, tuple | list) and len(item) > 0 else item
        if not isinstance(x, Tensor):
            raise TypeError(
                f"The 'calib' argument's item {i} must be a tensor or an (inputs, labels) "
                f"tuple. Got {type(item).__name__} instead."
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
            batches.append(x.to(device, dtype))
            seen += len(x)
        if max_images is not None and seen >= max_images:
            break
    if not batches:
        raise ValueError("The 'calib' argument must contain at least one image. Got no images.")
    return batches


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


# --------------------------------------------------------------------------- statistics


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        return tuple(conv._reversed_padding_repeated_twice)  # (left, right, top, bottom)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _accumulate(
    unit: Unit,
    original: nn.Module,
    pruned: nn.Module,
    batches: list[Tensor],
    *,
    samples_per_image: int | None,
    seed: int,
    progress: bool,
) -> PatchStats | ChannelStats:
    """One pass over the calibration set: X from ``pruned``, Y from ``original``."""
    consumer_o = original.get_submodule(unit.consumer)
    consumer_p = pruned.get_submodule(unit.consumer)
    weight = consumer_p.weight.detach()
    n = weight.shape[0]
    c, k = unit.width, unit.taps
    device = weight.device
    if c * k <= MAX_PATCH_DIM:
        stats: PatchStats | ChannelStats = PatchStats(c, k, n, device=device)
    else:
        stats = ChannelStats(weight.reshape(n, c, k), device=device)
    key = layer_key(unit.name)
    captured: dict[str, Tensor] = {}

    def take_y(module, inputs, output):
        y = output.detach()
        if module.bias is not None:
            shape = (1, -1) + (1,) * (y.dim() - 2)
            y = y - module.bias.detach().view(shape)
        if unit.consumer_kind == "conv":
            pos = sample_positions(
                y.shape[0],
                y.shape[2] * y.shape[3],
                samples_per_image,
                seed=seed,
                layer=key,
                image_offset=captured["offset"],
                device=y.device,
            )
            captured["positions"] = pos
            captured["out_width"] = y.shape[3]
            y = gather_targets(y, pos)
        captured["y"] = y
        raise _StopForward

    def take_x(module, inputs):
        x = inputs[0].detach()
        if unit.consumer_kind == "conv":
            x = gather_patches(
                x,
                captured["positions"],
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=_conv_padding(module),
                dilation=module.dilation,
                out_width=captured["out_width"],
            )
        else:
            x = x.reshape(x.shape[0], -1)
        captured["x"] = x
        raise _StopForward

    h_o = consumer_o.register_forward_hook(take_y)
    h_p = consumer_p.register_forward_pre_hook(take_x)
    offset = 0
    try:
        bar = tqdm(batches, desc=f"  {unit.name}", leave=False, disable=not progress, unit="batch")
        for xb in bar:
            captured.clear()
            captured["offset"] = offset
            for model in (original, pruned):
                try:
                    model(xb)
                except _StopForward:
                    pass
            if "y" not in captured or "x" not in captured:
                raise RuntimeError(
                    f"layer '{unit.consumer}' was not reached in forward(); recon cannot "
                    "collect its statistics."
                )
            x, y = captured["x"], captured["y"]
            for i in range(0, x.shape[0], _ROWS_PER_UPDATE):
                stats.update(x[i : i + _ROWS_PER_UPDATE], y[i : i + _ROWS_PER_UPDATE])
            offset += xb.shape[0]
    finally:
        h_o.remove()
        h_p.remove()
    return stats


def _output_error(original: nn.Module, pruned: nn.Module, batches: list[Tensor]) -> float:
    num = den = 0.0
    for xb in batches:
        ref = original(xb).double()
        out = pruned(xb).double()
        num += float(((out - ref) ** 2).sum())
        den += float((ref**2).sum())
    return num / den if den > 0 else 0.0


# --------------------------------------------------------------------------- one unit


def _prune_one(
    unit: Unit,
    target: int,
    stats: PatchStats | ChannelStats,
    pruned: nn.Module,
    *,
    method: str,
    reconstruct: str,
    seed: int,
) -> tuple[Tensor, LayerReport]:
    t0 = time.perf_counter()
    producer = pruned.get_submodule(unit.producer)
    consumer = pruned.get_submodule(unit.consumer)
    n = consumer.weight.shape[0]
    w_cons = consumer.weight.detach().reshape(n, unit.width, unit.taps)  # (n, c, k)
    A, b = stats.channel_problem(w_cons)
    scores = None
    if method == "l1":
        scores = producer.weight.detach().abs().reshape(unit.width, -1).sum(1)
    elif method == "max_response":
        scores = w_cons.abs().sum(dim=(0, 2), dtype=torch.float64)
    keep = select_channels(
        method,
        target,
        A=A,
        b=b,
        scores=scores,
        width=unit.width,
        seed=_mix(seed, layer_key(unit.name)),
    ).to(A.device)
    err_before = channel_error(A, b, stats.yy, keep)
    note = ""
    weight = bias_delta = None
    mode = reconstruct
    if mode == "lstsq" and isinstance(stats, ChannelStats):
        mode = "scale"
        note = f"lstsq->scale (c*k={unit.width * unit.taps} too wide for a patch Gram)"
    if mode == "lstsq":
        unknowns = int(keep.numel()) * unit.taps + 1
        if stats.count < unknowns:
            warnings.warn(
                f"re-fitting '{unit.consumer}' from {stats.count} samples for {unknowns} "
                "unknowns per output: the fit is under-determined and may not generalise; "
                "use more calibration images or samples_per_image",
                stacklevel=3,
            )
        weight, bias_delta = lstsq(stats, keep, fit_bias=True)
        err_after = patch_error(stats, keep, weight, bias_delta)
    elif mode == "scale":
        s = scale(A, b, keep)
        err_after = channel_error(A, b, stats.yy, keep, s)
        weight = w_cons[:, keep.to(w_cons.device)].double() * s.to(w_cons.device)[None, :, None]
    else:
        err_after = err_before
    if weight is not None and not _finite(weight):
        raise FloatingPointError(f"re-fitting '{unit.consumer}' produced non-finite weights")
    prune_unit(pruned, unit, keep.cpu(), weight=weight, bias_delta=bias_delta)
    report = LayerReport(
        name=unit.name,
        kind="conv",
        channels_before=unit.width,
        channels_after=int(keep.numel()),
        method=method,
        reconstruct=reconstruct,
        error_before=err_before,
        error_after=err_after,
        seconds=time.perf_counter() - t0,
        note=note,
    )
    return keep.cpu(), report


# --------------------------------------------------------------------------- public


def prune(
    model: nn.Module,
    calib: Tensor | Iterable[Any],
    *,
    method: str = "lasso",
    reconstruct: str = "lstsq",
    speedup: float | None = None,
    keep_ratio: float | Mapping[str, float] | None = None,
    channels: Mapping[str, int] | None = None,
    samples_per_image: int | None = 10,
    max_images: int | None = None,
    ignored_layers: Iterable[str] = (),
    round_to: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    inplace: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune the channels of a trained CNN in one shot, re-fitting each layer.

    Layers are pruned in forward order. For each prunable unit (a producer conv and the
    layer that reads its channels), the consumer's input patches ``x`` are taken from
    the partly pruned network and its outputs ``y`` from the original network, at the
    same seeded positions; their float64 sums give the channel problem from which
    ``method`` picks the channels to keep, and the consumer is re-fitted to minimise

    .. math:: \\sum \\|y - W' x_S - \\beta\\|^2

    (``reconstruct="lstsq"``). The producer's output channels, the BatchNorms between
    and the consumer's inputs are then removed physically.

    Parameters
    ----------
    model : nn.Module
        A trained network built from standard layers (traceable by ``torch.fx``).
        It is not modified unless ``inplace=True``.
    calib : Tensor or iterable
        Calibration images: a tensor (N, C, H, W), or an iterable (e.g. a DataLoader)
        of such tensors or of ``(inputs, labels)`` tuples; labels are ignored.
    method : {"lasso", "thinet", "l1", "max_response", "first_k", "random"}
        Channel selection (He et al. 2017 LASSO, Luo et al. 2017 ThiNet greedy, or a
        baseline).
    reconstruct : {"lstsq", "scale", "none"}
        Re-fit the consumer by least squares with its bias, by ThiNet's per-channel
        scaling, or not at all.
    speedup, keep_ratio, channels
        Exactly one target: a FLOPs ratio original/pruned (>= 1); a keep ratio in (0, 1]
        for every unit or a dict unit name -> ratio; or a dict unit name -> channels.
        Unit names are the producer layers' qualified names (``"features.0"``).
    samples_per_image : int or None, default 10
        Output positions sampled per image and layer; None for every position.
    max_images : int, optional
        Use at most this many calibration images.
    ignored_layers : iterable of str
        Units never pruned.
    round_to : int, default 1
        Channel counts are rounded to a multiple of this (or the full width).
    seed : int, default 0
        Seeds position sampling and the ``random`` method.
    device : str or torch.device, optional
        Where to run; defaults to the model's device.
    inplace : bool, default False
        Prune ``model`` itself instead of a copy.
    progress : bool, default True
        Show tqdm progress bars.

    Returns
    -------
    PruneResult
        ``.model``, ``.report``, ``.channels``, ``.kept``.

    Examples
    --------
    >>> import torch, recon
    >>> from recon.models import vgg11
    >>> net = vgg11(width=0.125).eval()
    >>> result = recon.prune(net, torch.randn(128, 3, 32, 32), keep_ratio=0.5, progress=False)
    >>> result.model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    t_start = time.perf_counter()
    if isinstance(ignored_layers, str):
        ignored_layers = (ignored_layers,)
    elif isinstance(ignored_layers, Iterable):
        ignored_layers = tuple(ignored_layers)  # a generator is read once only
    else:
        raise TypeError(
            "The 'ignored_layers' argument must be an iterable of layer names. "
            f"Got {type(ignored_layers).__name__} instead."
        )
    _check_args(method, reconstruct, samples_per_image, max_images, seed, round_to)
    _check_model(model)
    if not isinstance(inplace, bool):
        raise TypeError(f"The 'inplace' argument must be a bool. Got {inplace!r} instead.")
    try:
        dev = torch.device(device) if device is not None else model_device(model)
    except (RuntimeError, TypeError) as exc:
        raise _bad("device", "a torch device such as 'cpu' or 'cuda:0'", device) from exc
    batches = _calibration_batches(calib, max_images, dev, model_dtype(model))
    graph = find_units(model)
    if not graph.units:
        reasons = "; ".join(f"'{k}': {v}" for k, v in list(graph.skipped.items())[:5])
        raise ValueError(
            f"recon found no prunable layers in {type(model).__name__}"
            + (f" ({reasons})" if reasons else " (it has no Conv2d layers)")
        )
    _check_layer_names(
        graph, keep_ratio=keep_ratio, channels=channels, ignored_layers=ignored_layers
    )

    modes = {name: m.training for name, m in model.named_modules()}
    original = copy.deepcopy(model).to(dev).eval()
    example = batches[0][:1]
    try:
        with torch.no_grad():
            original(example)
    except Exception as exc:
        raise ValueError(
            f"The 'calib' argument's batches of shape {tuple(batches[0].shape)} do not fit the "
            f"model ({type(exc).__name__}: {exc})."
        ) from exc
    flops_before, module_flops = _budget.count_flops(original, example)
    budget_units = [
        _budget.BudgetUnit(u.name, u.width, (u.producer,), (u.consumer,)) for u in graph.units
    ]
    targets = _budget.resolve_channels(
        budget_units,
        speedup=speedup,
        keep_ratio=keep_ratio,
        channels=channels,
        ignored_layers=ignored_layers,
        round_to=round_to,
        module_flops=module_flops,
        total_flops=flops_before,
    )
    params_before = _budget.count_params(original)

    # Everything above validates; only now is a model changed.
    pruned = model if inplace else copy.deepcopy(model)
    pruned.to(dev).eval()
    layers: list[LayerReport] = []
    kept: dict[str, list[int]] = {}
    todo = [u for u in graph.units if targets[u.name] < u.width]
    bar = tqdm(todo, desc="recon", disable=not progress, unit="layer")
    with torch.no_grad():
        for unit in bar:
            bar.set_postfix_str(f"{unit.name} {unit.width}->{targets[unit.name]}")
            t0 = time.perf_counter()
            stats = _accumulate(
                unit,
                original,
                pruned,
                batches,
                samples_per_image=samples_per_image,
                seed=seed,
                progress=progress,
            )
            t_stats = time.perf_counter() - t0
            keep, row = _prune_one(
                unit,
                targets[unit.name],
                stats,
                pruned,
                method=method,
                reconstruct=reconstruct,
                seed=seed,
            )
            row.seconds += t_stats
            layers.append(row)
            kept[unit.name] = keep.tolist()
            del stats
        out_err = _output_error(original, pruned, batches)
    for unit in graph.units:  # units left whole keep every channel
        kept.setdefault(unit.name, list(range(unit.width)))
    kept = {u.name: kept[u.name] for u in graph.units}
    flops_after, _ = _budget.count_flops(pruned, example)
    for name, m in pruned.named_modules():
        if name in modes:
            m.train(modes[name])
    report = Report(
        layers=layers,
        flops_before=int(flops_before),
        flops_after=int(flops_after),
        params_before=int(params_before),
        params_after=int(_budget.count_params(pruned)),
        seconds=time.perf_counter() - t_start,
        method=method,
        reconstruct=reconstruct,
        output_error=out_err if math.isfinite(out_err) else None,
    )
    counts = {u.name: targets[u.name] for u in graph.units}
    return PruneResult(model=pruned, report=report, channels=counts, kept=kept)
