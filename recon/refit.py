"""One unit: select its channels from its statistics, re-fit the consumer, cut.

This module sees one unit's statistics and the modules it changes.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import distributed as _dist
from ._checks import _finite
from ._timing import PhaseTimer
from .graph import Unit
from .groups import group_slices, quota_order
from .report import LayerReport
from .sampling import _mix, layer_key
from .scores import channel_scores
from .select import SCORE_METHODS, channel_order, obs_shared, select_channels
from .solve import LSTSQ_MODES, channel_error, cv_lstsq, lstsq, patch_error, scale
from .stats import ChannelStats, GroupedStats, PatchStats
from .surgery import channel_offset, consumer_weight, prune_unit


class _Part(NamedTuple):
    """One group's (or the whole unit's) selection and re-fit."""

    keep: Tensor  # (m,) channels of the part, local indices
    weight: Tensor | None  # (n_part, m*k) re-fitted consumer weight, or None
    bias_delta: Tensor | None
    err_before: float  # relative errors
    err_after: float
    yy: float  # ‖Y‖² of the part's outputs: the errors' weight in the unit's
    ridge: float
    heldout: float
    note: str


def _prune_one(
    unit: Unit,
    target: int,
    stats: PatchStats | ChannelStats | GroupedStats,
    pruned: nn.Module,
    *,
    method: str,
    reconstruct: str,
    seed: int,
    row_scale: Tensor | None = None,
    timer: PhaseTimer | None = None,
    ctx: _dist.Context | None = None,
) -> tuple[Tensor, LayerReport]:
    """Select ``target`` channels of ``unit`` from ``stats``, re-fit, and cut.

    With ``row_scale`` (a block-sum target), the statistics are in units of the block's
    sum: the consumer's output rows are scaled by it for selection and re-fitting, and
    the re-fitted rows scaled back. ``timer`` gets the select, solve and surgery times.
    In a distributed run (``ctx``), rank 0's channels and re-fitted weights are used
    by every rank. A grouped consumer is one problem per group (:mod:`recon.groups`),
    each keeping ``target / groups`` channels.
    """
    t0 = time.perf_counter()
    timer = timer or PhaseTimer()
    if unit.readers:
        return _prune_shared(
            unit,
            target,
            stats,
            pruned,
            method=method,
            reconstruct=reconstruct,
            seed=seed,
            timer=timer,
            ctx=ctx,
            t0=t0,
        )
    timer.push("select")
    consumer = pruned.get_submodule(unit.consumer)
    # (n, c, k): block diagonal when grouped, the unit's slice when concatenated
    offset = channel_offset(pruned, unit)
    w_cons = consumer_weight(consumer, unit, offset)
    n = w_cons.shape[0]
    a = None if row_scale is None else row_scale.to(w_cons.device)
    scores = channel_scores(method, unit, pruned, stats) if method in SCORE_METHODS else None
    parts = []
    for g, (chans, outs) in enumerate(group_slices(unit.width, n, unit.groups)):
        grouped = unit.groups > 1
        parts.append(
            _fit_part(
                unit,
                target // unit.groups,
                stats.subset(chans, outs) if grouped else stats,
                w_cons[outs, chans],
                None if a is None else a[outs],
                None if scores is None else scores[chans],
                method=method,
                reconstruct=reconstruct,
                seed=_mix(seed, layer_key(f"{unit.name}/{g}" if grouped else unit.name)),
                label=f"{unit.name} group {g}" if grouped else unit.name,
                warn=g == 0,
                timer=timer,
                ctx=ctx,
            )
        )
    cpg = unit.width // unit.groups
    keep = torch.cat([p.keep.cpu() + g * cpg for g, p in enumerate(parts)])
    weight, bias_delta = _fitted(parts, unit.consumer, ctx)
    gate = gate_fit(unit, stats, keep, pruned, reconstruct)
    if ctx is not None and gate is not None:
        gate = tuple(ctx.broadcast_(t, f"gate of {unit.name}") for t in gate)
    timer.swap("surgery")
    prune_unit(pruned, unit, keep, weight=weight, bias_delta=bias_delta, gate=gate)
    timer.pop()
    note = parts[0].note
    if unit.groups > 1:
        note = _join(f"{unit.groups} groups", note)
    if unit.cat_lead is not None:
        note = _join(f"channels {offset}..{offset + unit.width - 1} of a concatenation", note)
    return keep, _report(unit, keep, parts, note, method, reconstruct, t0)


def _fitted(
    parts: list[_Part], consumer: str, ctx: _dist.Context | None
) -> tuple[Tensor | None, Tensor | None]:
    """The parts' re-fitted weights (rows stacked, (n, m*k)) and bias changes for
    ``consumer``: rank 0's in a distributed run, checked to be finite."""
    weight = bias_delta = None
    if parts[0].weight is not None:
        weight = torch.cat([p.weight.reshape(p.weight.shape[0], -1) for p in parts])
        if ctx is not None:
            weight = ctx.broadcast_(weight, f"weights of {consumer}")
    if parts[0].bias_delta is not None:
        bias_delta = torch.cat([p.bias_delta for p in parts])
        if ctx is not None:
            bias_delta = ctx.broadcast_(bias_delta, f"bias of {consumer}")
    if weight is not None and not _finite(weight):
        raise FloatingPointError(f"re-fitting '{consumer}' produced non-finite weights")
    return weight, bias_delta


def _report(
    unit: Unit,
    keep: Tensor,
    parts: list[_Part],
    note: str,
    method: str,
    reconstruct: str,
    t0: float,
) -> LayerReport:
    """The unit's report row; errors are the parts' (groups' or readers'), weighted by
    their ‖Y‖²."""
    yy = sum(p.yy for p in parts)

    def mean(values: list[float]) -> float:
        if len(values) == 1:
            return values[0]
        return sum(v * p.yy for v, p in zip(values, parts, strict=True)) / yy if yy > 0 else 0.0

    return LayerReport(
        name=unit.name,
        kind="sampler"
        if unit.kind == "sampler"
        else unit.consumer_kind
        if unit.consumer_kind in ("tokens", "heads")
        else "conv",
        channels_before=unit.width,
        channels_after=int(keep.numel()),
        method=method,
        reconstruct=reconstruct,
        error_before=mean([p.err_before for p in parts]),
        error_after=mean([p.err_after for p in parts]),
        seconds=time.perf_counter() - t0,
        note=note,
        ridge=float(torch.tensor([p.ridge for p in parts]).median()),
        heldout_error=mean([p.heldout for p in parts]),
    )


def _prune_shared(
    unit: Unit,
    target: int,
    stats: PatchStats | ChannelStats,
    pruned: nn.Module,
    *,
    method: str,
    reconstruct: str,
    seed: int,
    timer: PhaseTimer,
    ctx: _dist.Context | None,
    t0: float,
) -> tuple[Tensor, LayerReport]:
    """:func:`_prune_one` for a unit read by several convs (:attr:`Unit.readers`).

    The channels are chosen once for all readers, on the sum of their channel problems
    each divided by its ``‖Y_r‖²`` (so every reader's relative error counts alike):
    ``min_S Σ_r ‖Y_r − Σ_{i∈S} X_{r,i} W_{r,i}‖² / ‖Y_r‖²`` (``obs``: on the sum of the
    readers' re-fitted errors, likewise divided); then each reader is re-fitted on them
    from its own statistics.
    """
    timer.push("select")
    readers = (unit, *unit.readers)
    parts_stats = [stats, *stats.readers]
    weights = [
        consumer_weight(pruned.get_submodule(r.consumer), r, channel_offset(pruned, r))
        for r in readers
    ]  # (n_r, c, k) each
    A = b = None
    for st, w in zip(parts_stats, weights, strict=True):
        A_r, b_r = st.channel_problem(w)
        yy = float(st.yy) if float(st.yy) > 0 else 1.0
        A, b = (A_r / yy, b_r / yy) if A is None else (A + A_r / yy, b + b_r / yy)
    if not (_finite(A) and _finite(b)):
        raise FloatingPointError(
            f"the statistics of the readers of '{unit.name}' are not finite (NaN or inf): "
            "the activations around them overflow on some calibration image"
        )
    scores = channel_scores(method, unit, pruned, stats) if method in SCORE_METHODS else None
    key = _mix(seed, layer_key(unit.name))
    patches = all(isinstance(st, PatchStats) for st in parts_stats)
    obs = method == "obs" and reconstruct in LSTSQ_MODES and patches  # on the re-fit's error
    norm = [1.0 / float(st.yy) if float(st.yy) > 0 else 1.0 for st in parts_stats]
    if unit.producer_groups > 1:  # each group of the producer keeps as many
        order = (
            obs_shared(parts_stats, norm)
            if obs
            else channel_order(method, A=A, b=b, scores=scores, width=unit.width, seed=key)
        )
        keep = quota_order(order.to(A.device), unit.width, unit.producer_groups)[:target]
        keep = keep.sort().values
    elif obs:
        keep = obs_shared(parts_stats, norm, target).to(A.device)
    else:
        keep = select_channels(
            method, target, A=A, b=b, scores=scores, width=unit.width, seed=key
        ).to(A.device)
    if ctx is not None:
        keep = ctx.broadcast_(keep, f"channels of {unit.name}")
    parts = [
        _fit_part(
            r,
            target,
            st,
            w,
            None,
            None,
            method=method,
            reconstruct=reconstruct,
            seed=key,
            label=r.consumer,
            warn=i == 0,
            timer=timer,
            ctx=ctx,
            keep=keep,
        )
        for i, (r, st, w) in enumerate(zip(readers, parts_stats, weights, strict=True))
    ]
    fits = [_fitted([p], r.consumer, ctx) for r, p in zip(readers, parts, strict=True)]
    keep = keep.cpu()
    timer.swap("surgery")
    prune_unit(pruned, unit, keep, weight=[w for w, _ in fits], bias_delta=[d for _, d in fits])
    timer.pop()
    note = _join(f"{len(readers)} readers", parts[0].note)
    return keep, _report(unit, keep, parts, note, method, reconstruct, t0)


def gate_fit(
    unit: Unit, stats: object, keep: Tensor, model: nn.Module, reconstruct: str
) -> tuple[Tensor, Tensor] | None:
    """The re-fitted squeeze conv (fc1) of ``unit``'s gate on the kept channels, and the
    change of its bias; None without a gate or a least-squares re-fit.

    fc1 reads the pooled channels ``p`` (one sample per image); with channels ``S``
    kept, ``min ‖W₁p − W₁'p_S − δ‖²`` over the calibration images keeps its output —
    and so the gate on the kept channels — as near as ``S`` allows (cross-validated as
    the consumer's re-fit is, for ``reconstruct="lstsq"``).
    """
    gate = getattr(stats, "gate", None)
    if unit.gate is None or gate is None or reconstruct not in LSTSQ_MODES:
        return None
    fc1 = model.get_submodule(unit.gate[0])
    w = fc1.weight.detach().reshape(fc1.out_channels, unit.width, 1).double()
    keep = keep.to(gate.G.device)
    if reconstruct == "lstsq":
        fit = cv_lstsq(gate, keep, w)
        return fit.weight, fit.bias_delta
    return lstsq(gate, keep, fit_bias=True)


def _fit_part(
    unit: Unit,
    target: int,
    stats: PatchStats | ChannelStats,
    w_cons: Tensor,
    a: Tensor | None,
    scores: Tensor | None,
    *,
    method: str,
    reconstruct: str,
    seed: int,
    label: str,
    warn: bool,
    timer: PhaseTimer,
    ctx: _dist.Context | None,
    keep: Tensor | None = None,
) -> _Part:
    """Select ``target`` of the channels of ``stats`` and re-fit ``w_cons`` (n, c, k) on them.

    ``label`` names the part in messages. The re-fitted weight is in the consumer's own
    units (``a`` undone). With ``keep`` the channels are chosen already (by every
    reader of the unit together): only the re-fit is done.
    """
    timer.swap("select")
    n = w_cons.shape[0]
    width = w_cons.shape[1]
    w_units = w_cons if a is None else w_cons.double() * a[:, None, None]  # (n, c, k)
    patches = isinstance(stats, PatchStats)
    refit = reconstruct in LSTSQ_MODES and patches
    # Before a least-squares re-fit, the whole channel problem only where the selection
    # reads it (obs reads the patch statistics); the errors need only the kept channels'.
    A = b = None
    if not refit or (keep is None and _reads_channel_problem(method)):
        A, b = stats.channel_problem(w_units)
        _check_finite((A, b), unit, w_cons)
    else:
        _check_finite(_patch_sums(stats), unit, w_cons)
    note = "block target" if a is not None else ""
    obs_stats = stats if reconstruct in LSTSQ_MODES else None  # obs: its re-fit
    device = stats.Cf.device if patches else A.device
    given = keep is not None
    if given:
        keep = keep.to(device)
    elif unit.producer_groups > 1:  # each group of the producer keeps as many
        order = channel_order(
            method, A=A, b=b, scores=scores, width=width, seed=seed, stats=obs_stats
        )
        keep = quota_order(order.to(device), width, unit.producer_groups)[:target].sort().values
    else:
        keep = select_channels(
            method, target, A=A, b=b, scores=scores, width=width, seed=seed, stats=obs_stats
        ).to(device)
    if ctx is not None and not given:
        keep = ctx.broadcast_(keep, f"channels of {label}")
    timer.swap("solve")
    chosen = keep
    err_before = math.nan if A is None else channel_error(A, b, stats.yy, keep)
    if reconstruct == "lstsq_plain" and patches:  # gathered once for the error and the fit
        stats = stats.restrict(keep)
        w_units = w_units[:, keep.to(w_units.device)]
        w_cons = w_cons[:, keep.to(w_cons.device)]
        keep = torch.arange(int(keep.numel()), device=device)
        if A is None:  # ‖Y − X_S W_Sᵀ‖², the kept channels' channel_error
            err_before = patch_error(stats, keep, w_units.reshape(n, -1))
    weight = bias_delta = None
    mode = reconstruct
    ridge = heldout = math.nan
    if mode in LSTSQ_MODES and isinstance(stats, ChannelStats):
        mode = "scale"
        note = _join(note, f"{reconstruct}->scale (c*k={unit.width * unit.taps} too wide)")
    if mode in LSTSQ_MODES:
        unknowns = int(keep.numel()) * unit.taps + 1
        if mode == "lstsq":
            fit = cv_lstsq(stats, keep, w_units.double())
            weight, bias_delta = fit.weight, fit.bias_delta
            err_after = fit.error
            if A is None:  # the error of the kept channels' weights, from the same sums
                err_before = fit.error_given
            ridge, heldout = fit.ridge, fit.heldout_error
            if math.isinf(ridge):
                note = _join(note, f"{fit.center} fit (held out, least squares did worse)")
            elif ridge > 0:
                note = _join(note, f"ridge to {fit.center}")
            done = (
                f"cross-validation chose a ridge of {ridge:g} towards the {fit.center} fit "
                f"(held-out error {heldout:.4g})"
            )
        else:
            weight, bias_delta = lstsq(stats, keep, fit_bias=True)
            err_after = patch_error(stats, keep, weight, bias_delta)
            done = "plain least squares may not generalise; reconstruct='lstsq' guards against this"
        if warn and stats.count < unknowns:
            warnings.warn(
                f"re-fitting '{unit.consumer}' from {stats.count} samples for {unknowns} "
                f"unknowns per output is under-determined: {done}. More calibration images "
                "or samples_per_image give a better fit",
                stacklevel=5,  # _fit_part <- _prune_one <- _prune_units <- prune <- caller
            )
        if a is not None:  # back from units of the block's sum to the conv's output
            live = a.abs() > 1e-12 * a.abs().max()
            safe = torch.where(live, a, torch.ones_like(a))
            old = w_cons[:, keep.to(w_cons.device)].reshape(n, -1).double()
            weight = torch.where(live[:, None], weight / safe[:, None], old)
            bias_delta = torch.where(live, bias_delta / safe, torch.zeros_like(bias_delta))
    elif mode == "scale":
        s = scale(A, b, keep)
        err_after = channel_error(A, b, stats.yy, keep, s)
        weight = w_cons[:, keep.to(w_cons.device)].double() * s.to(w_cons.device)[None, :, None]
    else:
        err_after = err_before
    return _Part(
        chosen, weight, bias_delta, err_before, err_after, float(stats.yy), ridge, heldout, note
    )


def _reads_channel_problem(method: str) -> bool:
    """Whether selecting by ``method`` before a least-squares re-fit reads the channel
    problem ``A, b``: ``obs`` then reads the patch statistics, the score methods and
    ``first_k``, ``random`` read neither."""
    return method in ("lasso", "thinet")


def _patch_sums(stats: PatchStats) -> tuple[Tensor, ...]:
    """What makes every sum of ``stats`` finite if it is: ``Σ x²`` per entry (a Gram's
    diagonal bounds the rest of it), ``Σ y²``, ``Σ x yᵀ`` and ``Σ x``."""
    return stats.Gf.diagonal(dim1=1, dim2=2), stats.yyf, stats.Cf, stats.sf


def _check_finite(sums: tuple[Tensor, ...], unit: Unit, w_cons: Tensor) -> None:
    if not all(_finite(t) for t in sums):  # activations overflowed on some image
        raise FloatingPointError(
            f"the statistics of '{unit.consumer}' are not finite (NaN or inf): the "
            f"activations around it overflow {w_cons.dtype} on some calibration image"
        )


def _join(note: str, more: str) -> str:
    return f"{note}, {more}" if note and more else note or more
