"""FLOPs and parameter counting, and turning a pruning target into channels per unit.

A *unit* is a producer layer whose output channels can be removed. Keeping ``k`` of
its ``width`` channels scales the FLOPs of the producer on its output side and of
its consumer layer(s) on their input side by ``k / width``. :func:`predict_flops`
evaluates the FLOPs of a network for any choice of channel counts from the FLOPs
of one forward pass of the unpruned network (:func:`count_flops`), and
:func:`resolve_channels` turns a target (a speedup, keep ratios or explicit
counts) into a channel count for every unit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .layers import HeadAttention, SampledConv2d, is_window_attention

__all__ = [
    "BudgetUnit",
    "achieved_speedup",
    "count_flops",
    "count_params",
    "predict_flops",
    "resolve_channels",
]

# The greedy adjustment of :func:`resolve_channels` stops once the achieved speedup
# is within this relative distance of the target.
SPEEDUP_RTOL = 0.01
# Units whose names are listed in full in error messages; the rest are counted.
_MAX_LISTED_NAMES = 8
_BISECTION_STEPS = 60
_MAX_GREEDY_STEPS = 10_000


@dataclass(frozen=True)
class BudgetUnit:
    """One prunable group of channels, as the budget sees it.

    Parameters
    ----------
    name : str
        Unit name: the producer module's qualified name, e.g. ``"features.0"``.
    width : int
        Current number of output channels of the producer.
    out_modules : tuple of str
        Qualified names of modules whose FLOPs scale with ``kept / width`` on their
        output side (the producer convolution).
    in_modules : tuple of str
        Qualified names of modules whose FLOPs scale with ``kept / width`` on their
        input side (the consumer convolution or linear layer).
    step : int, default 1
        Kept counts must be multiples of this (or the width): the groups of a grouped
        producer or consumer. It combines with ``round_to`` as their least common
        multiple.
    in_shares : tuple of float, default ()
        For each of ``in_modules``, the fraction of its input channels the unit holds
        (all 1 when empty). A module read in part (a concatenation of several units)
        scales by ``1 - Σ_u share_u (1 - r_u)`` on its input side: the units add up.
    """

    name: str
    width: int
    out_modules: tuple[str, ...]
    in_modules: tuple[str, ...]
    step: int = 1
    in_shares: tuple[float, ...] = ()

    def shares(self) -> dict[str, float]:
        """The share of each input-side module (1 unless ``in_shares`` says less)."""
        shares = self.in_shares or (1.0,) * len(self.in_modules)
        return dict(zip(self.in_modules, shares, strict=True))

    def round_to(self, round_to: int) -> int:
        """The step of this unit's counts under the global ``round_to``."""
        return math.lcm(round_to, self.step)


# --------------------------------------------------------------------------- counting


def count_flops(model: nn.Module, example_input: Tensor) -> tuple[int, dict[str, int]]:
    """Count the FLOPs of one forward pass of ``model`` on a single example.

    Parameters
    ----------
    model : nn.Module
        The network. It is run in eval mode under ``torch.no_grad()``; the
        train/eval mode of every submodule is restored afterwards.
    example_input : Tensor of shape (B, ...)
        An example input. Only the first item (``example_input[:1]``) is run, so the
        counts are per image.

    Returns
    -------
    total : int
        FLOPs of the whole forward pass.
    per_module : dict of str to int
        FLOPs of every leaf module (a module without children), keyed by its
        qualified name (``"features.0"``); leaves that do no counted work map to 0.

    Notes
    -----
    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts
    2 FLOPs per multiply-accumulate of convolutions and matrix products (and of
    scaled dot-product attention, whose CPU kernel recon gives torch's formula); bias
    additions, normalisation, activations and pooling are not counted. An attention
    layer (``nn.MultiheadAttention``, a Swin window attention, and their
    :mod:`recon.layers` replacements) counts as one
    leaf, its projections and attention products together: its output projection is not
    called as a module. So does a conv behind a sampler layer (a pruned residual
    network's :class:`recon.layers.SampledConv2d`, whose ``Sampler`` child only gathers
    channels), so that a pruned model pruned again sees its FLOPs. FLOPs of
    functional operations called outside any leaf module are in ``total`` but in no
    entry of ``per_module``.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    >>> count_flops(net, torch.zeros(4, 3, 8, 8))
    (27648, {'0': 27648, '1': 0})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be an nn.Module. Got {type(model).__name__} instead."
        )
    if not isinstance(example_input, Tensor):
        raise TypeError(
            "The 'example_input' argument must be a Tensor. "
            f"Got {type(example_input).__name__} instead."
        )
    if example_input.ndim >= 1 and example_input.shape[0] > 1:
        example_input = example_input[:1]

    modes = [(module, module.training) for module in model.modules()]
    counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        # nn.MultiheadAttention's fused inference kernel has no FLOPs formula: count
        # its projections and attention products one by one
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), counter:
            model(example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes:
            module.training = training

    # FlopCounterMode names modules "<RootClass>.<qualified name>".
    counts = {key: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    per_module: dict[str, int] = {}
    inside: tuple[str, ...] = ()  # attention layers: counted whole (see Notes)
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if _whole(module):
            inside = (*inside, name)
        elif next(module.children(), None) is not None:
            continue
        key = f"{root}.{name}" if name else root
        per_module[name] = int(counts.get(key, 0))
    return int(counter.get_total_flops()), per_module


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """FLOPs of scaled dot-product attention, as torch counts its CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: torch's counter has no formula for the CPU attention kernel (it would count 0).
_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops
}


def _whole(module: nn.Module) -> bool:
    """Whether ``module``'s FLOPs are counted as one leaf's (attention layers, and a conv
    behind a sampler layer: its ``Sampler`` child only gathers channels)."""
    return isinstance(
        module, nn.MultiheadAttention | HeadAttention | SampledConv2d
    ) or is_window_attention(module)


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters counted once).

    Parameters
    ----------
    model : nn.Module
        The network.

    Returns
    -------
    int
        Total number of parameter elements; buffers (BN running statistics) are not
        counted.

    Examples
    --------
    >>> count_params(nn.Linear(3, 2))
    8
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be an nn.Module. Got {type(model).__name__} instead."
        )
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------- prediction


def _module_scales(units: Sequence[BudgetUnit], ratios: Mapping[str, float]) -> dict[str, float]:
    """FLOPs scale factor of every module touched by a unit, for keep ratios per unit."""
    scales: dict[str, float] = {}
    parts: dict[str, float] = {}  # modules read in part: Σ share * (1 - r) so far
    for unit in units:
        r = ratios.get(unit.name, 1.0)
        for module in set(unit.out_modules):
            scales[module] = scales.get(module, 1.0) * r
        for module, share in unit.shares().items():
            if share < 1.0:
                parts[module] = parts.get(module, 0.0) + share * (1.0 - r)
            else:
                scales[module] = scales.get(module, 1.0) * r
    for module, lost in parts.items():
        scales[module] = scales.get(module, 1.0) * (1.0 - lost)
    return scales


def _predict(
    units: Sequence[BudgetUnit],
    ratios: Mapping[str, float],
    module_flops: Mapping[str, float],
    total_flops: float,
) -> float:
    scales = _module_scales(units, ratios)
    removed = sum(module_flops.get(m, 0) * (1.0 - s) for m, s in scales.items())
    return float(total_flops) - removed


def predict_flops(
    units: Sequence[BudgetUnit],
    channels: Mapping[str, int],
    module_flops: Mapping[str, int],
    total_flops: int,
) -> float:
    """FLOPs of the network when unit ``u`` keeps ``channels[u.name]`` channels.

    Parameters
    ----------
    units : sequence of BudgetUnit
        The prunable units.
    channels : mapping of str to int
        Channels kept per unit name; units not listed keep all their channels.
    module_flops : mapping of str to int
        FLOPs of each module in the unpruned network (from :func:`count_flops`);
        modules not listed count as 0.
    total_flops : int
        FLOPs of the unpruned network.

    Returns
    -------
    float
        Predicted FLOPs.

    Notes
    -----
    With ``r_u = channels[u] / width_u``, the prediction is

    .. math::

        F' = F - \\sum_m F_m + \\sum_m F_m
             \\prod_{u:\\, m \\in \\mathrm{out}(u)} r_u
             \\prod_{u:\\, m \\in \\mathrm{in}(u)} r_u,

    the sums running over every module named by a unit. A module that consumes one
    unit and produces another (an inner convolution) scales with the product of both
    ratios.

    Examples
    --------
    >>> a = BudgetUnit("a", 4, out_modules=("conv1",), in_modules=("conv2",))
    >>> predict_flops([a], {"a": 2}, {"conv1": 100, "conv2": 60}, 200)
    120.0
    """
    units = _check_units(units)
    widths = {u.name: u.width for u in units}
    _check_known("channels", channels, widths)
    ratios = {name: channels[name] / widths[name] for name in channels}
    return _predict(units, ratios, module_flops, total_flops)


def achieved_speedup(
    units: Sequence[BudgetUnit],
    channels: Mapping[str, int],
    module_flops: Mapping[str, int],
    total_flops: int,
) -> float:
    """Speedup ``total_flops / predict_flops(...)`` of a choice of channel counts.

    Parameters are those of :func:`predict_flops`.

    Returns
    -------
    float
        The FLOPs ratio; ``inf`` when no FLOPs are predicted to remain.
    """
    predicted = predict_flops(units, channels, module_flops, total_flops)
    return float(total_flops) / predicted if predicted > 0 else math.inf


# ------------------------------------------------------------------------- validation


def _names_hint(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED_NAMES])
    if len(names) > _MAX_LISTED_NAMES:
        shown += f", ... ({len(names) - _MAX_LISTED_NAMES} more)"
    return f"[{shown}]"


def _check_units(units: Sequence[BudgetUnit]) -> list[BudgetUnit]:
    if isinstance(units, BudgetUnit) or not isinstance(units, Iterable):
        raise TypeError(
            "The 'units' argument must be a sequence of BudgetUnit. "
            f"Got {type(units).__name__} instead."
        )
    units = list(units)
    seen: set[str] = set()
    for unit in units:
        if not isinstance(unit, BudgetUnit):
            raise TypeError(
                "The 'units' argument must be a sequence of BudgetUnit. "
                f"Got an item of type {type(unit).__name__} instead."
            )
        if isinstance(unit.width, bool) or not isinstance(unit.width, numbers.Integral):
            raise TypeError(
                f"The width of unit {unit.name!r} must be an int >= 1. Got {unit.width!r} instead."
            )
        if unit.width < 1:
            raise ValueError(
                f"The width of unit {unit.name!r} must be an int >= 1. Got {unit.width!r} instead."
            )
        step = unit.step
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
            raise ValueError(
                f"The step of unit {unit.name!r} must be an int >= 1. Got {step!r} instead."
            )
        if unit.width % step:
            raise ValueError(
                f"The step of unit {unit.name!r} must divide its width {unit.width}. "
                f"Got {step!r} instead."
            )
        if unit.in_shares and (
            len(unit.in_shares) != len(unit.in_modules)
            or not all(_is_real(v) and 0 < v <= 1 for v in unit.in_shares)
        ):
            raise ValueError(
                f"The in_shares of unit {unit.name!r} must be one number in (0, 1] per "
                f"input module ({len(unit.in_modules)}). Got {unit.in_shares!r} instead."
            )
        if unit.name in seen:
            raise ValueError(
                f"The 'units' argument must have unique names. Got {unit.name!r} twice."
            )
        seen.add(unit.name)
    return units


def _check_known(argument: str, names: Collection[str], widths: Mapping[str, int]) -> None:
    unknown = [n for n in names if n not in widths]
    if unknown:
        raise ValueError(
            f"The {argument!r} argument names unknown units {_names_hint(unknown)}. "
            f"Valid unit names are {_names_hint(widths)}."
        )


def _check_ignored(ignored_layers: object, widths: Mapping[str, int]) -> set[str]:
    """``ignored_layers`` (a name or an iterable of names) as a set of known unit names."""
    if isinstance(ignored_layers, str):
        ignored_layers = (ignored_layers,)
    if not isinstance(ignored_layers, Iterable):
        raise TypeError(
            "The 'ignored_layers' argument must be an iterable of unit names. "
            f"Got {type(ignored_layers).__name__} instead."
        )
    ignored = set(ignored_layers)
    _check_known("ignored_layers", ignored, widths)
    return ignored


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_ratio(label: str, value: object) -> float:
    if not _is_real(value):
        raise TypeError(
            f"The {label} argument must be a float in (0, 1]. "
            f"Got {value!r} of type {type(value).__name__} instead."
        )
    if not 0 < value <= 1:
        raise ValueError(f"The {label} argument must be a float in (0, 1]. Got {value!r} instead.")
    return float(value)


def _check_count(label: str, value: object, width: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"The {label} argument must be an int in [1, {width}]. "
            f"Got {value!r} of type {type(value).__name__} instead."
        )
    if not 1 <= value <= width:
        raise ValueError(
            f"The {label} argument must be an int in [1, {width}]. Got {value!r} instead."
        )
    return int(value)


# ------------------------------------------------------------------------ granularity


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _min_count(width: int, round_to: int) -> int:
    return min(round_to, width)


def _nearest_count(x: float, width: int, round_to: int) -> int:
    """Allowed count (a multiple of ``round_to`` below ``width``, or ``width``) nearest ``x``."""
    lo = max(round_to, math.floor(x / round_to) * round_to)
    candidates = {min(lo, width), min(lo + round_to, width), width}
    return min(sorted(candidates), key=lambda c: abs(c - x))


def _step_down(count: int, width: int, round_to: int) -> int | None:
    if count == width:
        below = (width - 1) // round_to * round_to
        return below if below >= round_to else None
    return count - round_to if count - round_to >= round_to else None


def _step_up(count: int, width: int, round_to: int) -> int | None:
    return None if count == width else min(count + round_to, width)


# -------------------------------------------------------------------------- resolving


def resolve_channels(
    units: Sequence[BudgetUnit],
    *,
    speedup: float | None = None,
    keep_ratio: float | Mapping[str, float] | None = None,
    channels: Mapping[str, int] | None = None,
    ignored_layers: Iterable[str] = (),
    round_to: int = 1,
    module_flops: Mapping[str, int] | None = None,
    total_flops: int | None = None,
) -> dict[str, int]:
    """Turn a pruning target into the number of channels each unit keeps.

    Exactly one of ``speedup``, ``keep_ratio`` and ``channels`` is given.

    Parameters
    ----------
    units : sequence of BudgetUnit
        The prunable units.
    speedup : float >= 1, optional
        Target FLOPs ratio ``total_flops / predicted``. Needs ``module_flops`` and
        ``total_flops``.
    keep_ratio : float in (0, 1] or mapping of str to float, optional
        Fraction of channels kept: one ratio for every unit not ignored, or one per
        listed unit (unlisted units keep all channels).
    channels : mapping of str to int, optional
        Channels kept per listed unit, each in ``[1, width]``; unlisted units keep
        all channels. Taken as given (``round_to`` does not apply).
    ignored_layers : iterable of str, default ()
        Units that keep all their channels.
    round_to : int >= 1, default 1
        Kept counts are multiples of ``round_to`` (or the full width).
    module_flops : mapping of str to int, optional
        Per-module FLOPs of the unpruned network, from :func:`count_flops`.
    total_flops : int, optional
        FLOPs of the unpruned network, from :func:`count_flops`.

    Returns
    -------
    dict of str to int
        Channels kept by every unit (ignored units at full width), in unit order.

    Notes
    -----
    A keep ratio ``r`` gives ``min(width, round_up(max(1, round(r * width)), round_to))``
    channels.

    For a ``speedup`` target ``s``, a uniform keep ratio ``r`` over the units not
    ignored is found by bisection so that ``total_flops / predict_flops(r) = s``
    (see :func:`predict_flops`). Counts are rounded to the nearest allowed value,
    then single units are moved by one ``round_to`` step at a time, each time the
    move that brings the achieved speedup closest to ``s`` (pairs of moves when no
    single move helps), until it is within 1 % of ``s`` or no move gets closer.

    Raises
    ------
    ValueError
        If the speedup cannot be reached even with ``min(round_to, width)``
        channels in every unit not ignored; the message gives the maximum.

    Examples
    --------
    >>> units = [BudgetUnit("a", 8, ("c1",), ("c2",)), BudgetUnit("b", 8, ("c2",), ("fc",))]
    >>> resolve_channels(units, keep_ratio=0.5, ignored_layers=["b"])
    {'a': 4, 'b': 8}
    >>> flops = {"c1": 100, "c2": 800, "fc": 100}
    >>> kept = resolve_channels(units, speedup=3.0, module_flops=flops, total_flops=1000)
    >>> kept
    {'a': 6, 'b': 3}
    >>> round(achieved_speedup(units, kept, flops, 1000), 3)
    2.963
    """
    units = _check_units(units)
    widths = {u.name: u.width for u in units}

    targets = {"speedup": speedup, "keep_ratio": keep_ratio, "channels": channels}
    given = [name for name, value in targets.items() if value is not None]
    if len(given) != 1:
        got = "none" if not given else " and ".join(repr(n) for n in given)
        raise ValueError(
            "Exactly one of the 'speedup', 'keep_ratio' and 'channels' arguments must be "
            f"given. Got {got}."
        )

    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral):
        raise TypeError(
            f"The 'round_to' argument must be an int >= 1. "
            f"Got {round_to!r} of type {type(round_to).__name__} instead."
        )
    if round_to < 1:
        raise ValueError(f"The 'round_to' argument must be an int >= 1. Got {round_to!r} instead.")
    round_to = int(round_to)

    ignored = _check_ignored(ignored_layers, widths)

    result = dict(widths)
    if channels is not None:
        _check_target_mapping("channels", channels, widths, ignored)
        steps = {u.name: u.step for u in units}
        for name, count in channels.items():
            result[name] = _check_count(f"'channels[{name!r}]'", count, widths[name])
            if result[name] % steps[name] and result[name] != widths[name]:
                raise ValueError(
                    f"The 'channels[{name!r}]' argument must be a multiple of {steps[name]} "
                    f"(the groups of its grouped convolution) or {widths[name]}. Got "
                    f"{result[name]} instead."
                )
        return result

    if keep_ratio is not None:
        steps = {u.name: u.round_to(round_to) for u in units}
        if isinstance(keep_ratio, Mapping):
            _check_target_mapping("keep_ratio", keep_ratio, widths, ignored)
            ratios = {n: _check_ratio(f"'keep_ratio[{n!r}]'", r) for n, r in keep_ratio.items()}
        else:
            r = _check_ratio("'keep_ratio'", keep_ratio)
            ratios = {n: r for n in widths if n not in ignored}
        for name, r in ratios.items():
            width = widths[name]
            count = math.floor(r * width + 0.5)  # round half up: 0.5 of 1 channel keeps it
            if count < 1 and width > 1:  # a 1-channel layer has nothing to remove
                arg = (
                    "keep_ratio" if not isinstance(keep_ratio, Mapping) else f"keep_ratio[{name!r}]"
                )
                raise ValueError(
                    f"The '{arg}' argument keeps {r:g} * {width} = {r * width:.3g} channels of "
                    f"layer '{name}'; it must keep at least one (ratio >= {0.5 / width:.3g}). "
                    "Use ignored_layers or a larger ratio."
                )
            result[name] = min(width, _round_up(max(count, 1), steps[name]))
        return result

    return _resolve_speedup(units, speedup, ignored, round_to, module_flops, total_flops)


def _check_target_mapping(
    argument: str, mapping: object, widths: Mapping[str, int], ignored: set[str]
) -> None:
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"The {argument!r} argument must be a dict of unit name to value. "
            f"Got {type(mapping).__name__} instead."
        )
    _check_known(argument, mapping, widths)
    both = [n for n in mapping if n in ignored]
    if both:
        raise ValueError(
            f"The {argument!r} argument lists units that 'ignored_layers' also lists: "
            f"{_names_hint(both)}. Ignored units keep all their channels; list each unit "
            "in one of them."
        )


def _resolve_speedup(
    units: list[BudgetUnit],
    speedup: object,
    ignored: set[str],
    round_to: int,
    module_flops: Mapping[str, int] | None,
    total_flops: int | None,
) -> dict[str, int]:
    if not _is_real(speedup):
        raise TypeError(
            "The 'speedup' argument must be a float >= 1. "
            f"Got {speedup!r} of type {type(speedup).__name__} instead."
        )
    if not speedup >= 1:  # also rejects NaN
        raise ValueError(f"The 'speedup' argument must be a float >= 1. Got {speedup!r} instead.")
    if not math.isfinite(speedup):
        raise ValueError(f"The 'speedup' argument must be finite. Got {speedup!r} instead.")
    if module_flops is None or total_flops is None:
        needed = {"module_flops": module_flops, "total_flops": total_flops}
        missing = [name for name, value in needed.items() if value is None]
        raise ValueError(
            "The 'module_flops' and 'total_flops' arguments are required with 'speedup' "
            f"(see count_flops). Got no {' and no '.join(repr(n) for n in missing)}."
        )
    if not _is_real(total_flops) or not total_flops > 0:
        raise ValueError(
            f"The 'total_flops' argument must be a number > 0. Got {total_flops!r} instead."
        )
    if not isinstance(module_flops, Mapping):
        raise TypeError(
            "The 'module_flops' argument must be a dict of module name to FLOPs. "
            f"Got {type(module_flops).__name__} instead."
        )

    widths = {u.name: u.width for u in units}
    result = dict(widths)
    if speedup == 1:
        return result
    free = [u.name for u in units if u.name not in ignored]
    target = float(speedup)

    def speedup_of(counts: Mapping[str, int]) -> float:
        ratios = {n: counts[n] / widths[n] for n in free}
        predicted = _predict(units, ratios, module_flops, total_flops)
        return total_flops / predicted if predicted > 0 else math.inf

    def distance(s: float) -> float:
        return abs(math.log(s / target))

    steps = {u.name: u.round_to(round_to) for u in units}
    smallest = {n: _min_count(widths[n], steps[n]) for n in free}
    best_possible = speedup_of({**result, **smallest})
    if best_possible < target * (1 - 1e-12):
        raise ValueError(
            "The 'speedup' argument must be at most the maximum achievable speedup, "
            f"{best_possible:.4g} (every unit not ignored keeping min(round_to={round_to}, "
            f"width) channels; {len(ignored)} unit(s) ignored). Got {speedup!r} instead."
        )

    # Bisection on a continuous uniform keep ratio: speedup_of decreases in r.
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        ratios = dict.fromkeys(free, mid)
        predicted = _predict(units, ratios, module_flops, total_flops)
        if predicted > 0 and total_flops / predicted < target:
            hi = mid
        else:
            lo = mid
    r = 0.5 * (lo + hi)
    for name in free:
        result[name] = _nearest_count(r * widths[name], widths[name], steps[name])

    # Greedy single-unit moves, then pairs of moves, until within tolerance.
    current = distance(speedup_of(result))
    for _ in range(_MAX_GREEDY_STEPS):
        if current <= math.log1p(SPEEDUP_RTOL) * (1 - 1e-9):
            break
        moves = _single_moves(result, widths, free, steps)
        best = min(moves, key=lambda m: distance(speedup_of(m)), default=None)
        if best is None or distance(speedup_of(best)) >= current:
            pairs = _pair_moves(result, widths, free, steps)
            best = min(pairs, key=lambda m: distance(speedup_of(m)), default=None)
            if best is None or distance(speedup_of(best)) >= current:
                break
        result = best
        current = distance(speedup_of(result))
    return result


def _single_moves(
    counts: dict[str, int], widths: Mapping[str, int], free: list[str], steps: Mapping[str, int]
) -> list[dict[str, int]]:
    moves = []
    for name in free:
        for step in (_step_down, _step_up):
            new = step(counts[name], widths[name], steps[name])
            if new is not None:
                moves.append({**counts, name: new})
    return moves


def _pair_moves(
    counts: dict[str, int], widths: Mapping[str, int], free: list[str], steps: Mapping[str, int]
) -> list[dict[str, int]]:
    moves = []
    for down in free:
        smaller = _step_down(counts[down], widths[down], steps[down])
        if smaller is None:
            continue
        for up in free:
            larger = _step_up(counts[up], widths[up], steps[up]) if up != down else None
            if larger is not None:
                moves.append({**counts, down: smaller, up: larger})
    return moves
