"""One unit: select its channels from its statistics, re-fit the consumer, cut.

This module sees one unit's statistics and the modules it changes.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import Tensor, nn

from . import distributed as _dist
from ._checks import _finite
from ._timing import PhaseTimer
from .graph import Unit
from .report import LayerReport
from .sampling import _mix, layer_key
from .scores import channel_scores
from .select import SCORE_METHODS, select_channels
from .solve import LSTSQ_MODES, channel_error, cv_lstsq, lstsq, patch_error, scale
from .stats import ChannelStats, PatchStats
from .surgery import prune_unit


def _prune_one(
    unit: Unit,
    target: int,
    stats: PatchStats | ChannelStats,
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
    by every rank.
    """
    t0 = time.perf_counter()
    timer = timer or PhaseTimer()
    timer.push("select")
    consumer = pruned.get_submodule(unit.consumer)
    n = consumer.weight.shape[0]
    w_cons = consumer.weight.detach().reshape(n, unit.width, unit.taps)  # (n, c, k)
    a = None
    if row_scale is not None:
        a = row_scale.to(w_cons.device)
        A, b = stats.channel_problem(w_cons.double() * a[:, None, None])
    else:
        A, b = stats.channel_problem(w_cons)
    if not (_finite(A) and _finite(b)):  # activations overflowed on some image
        raise FloatingPointError(
            f"the statistics of '{unit.consumer}' are not finite (NaN or inf): the "
            f"activations around it overflow {w_cons.dtype} on some calibration image"
        )
    scores = channel_scores(method, unit, pruned, stats) if method in SCORE_METHODS else None
    note = "block target" if a is not None else ""
    keep = select_channels(
        method,
        target,
        A=A,
        b=b,
        scores=scores,
        width=unit.width,
        seed=_mix(seed, layer_key(unit.name)),
        stats=stats if reconstruct in LSTSQ_MODES else None,  # obs: its re-fit
    ).to(A.device)
    if ctx is not None:
        keep = ctx.broadcast_(keep, f"channels of {unit.name}")
    err_before = channel_error(A, b, stats.yy, keep)
    timer.swap("solve")
    weight = bias_delta = None
    mode = reconstruct
    ridge = heldout = math.nan
    if mode in LSTSQ_MODES and isinstance(stats, ChannelStats):
        mode = "scale"
        note = _join(note, f"{reconstruct}->scale (c*k={unit.width * unit.taps} too wide)")
    if mode in LSTSQ_MODES:
        unknowns = int(keep.numel()) * unit.taps + 1
        if mode == "lstsq":
            w_units = w_cons.double() if a is None else w_cons.double() * a[:, None, None]
            fit = cv_lstsq(stats, keep, w_units)
            weight, bias_delta = fit.weight, fit.bias_delta
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
            done = "plain least squares may not generalise; reconstruct='lstsq' guards against this"
        if stats.count < unknowns:
            warnings.warn(
                f"re-fitting '{unit.consumer}' from {stats.count} samples for {unknowns} "
                f"unknowns per output is under-determined: {done}. More calibration images "
                "or samples_per_image give a better fit",
                stacklevel=4,  # _prune_one <- _prune_units <- prune <- caller
            )
        err_after = patch_error(stats, keep, weight, bias_delta)
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
    if ctx is not None and weight is not None:
        weight = ctx.broadcast_(weight, f"weights of {unit.consumer}")
        if bias_delta is not None:
            bias_delta = ctx.broadcast_(bias_delta, f"bias of {unit.consumer}")
    if weight is not None and not _finite(weight):
        raise FloatingPointError(f"re-fitting '{unit.consumer}' produced non-finite weights")
    timer.swap("surgery")
    prune_unit(pruned, unit, keep.cpu(), weight=weight, bias_delta=bias_delta)
    timer.pop()
    report = LayerReport(
        name=unit.name,
        kind="sampler" if unit.kind == "sampler" else "conv",
        channels_before=unit.width,
        channels_after=int(keep.numel()),
        method=method,
        reconstruct=reconstruct,
        error_before=err_before,
        error_after=err_after,
        seconds=time.perf_counter() - t0,
        note=note,
        ridge=ridge,
        heldout_error=heldout,
    )
    return keep.cpu(), report


def _join(note: str, more: str) -> str:
    return f"{note}, {more}" if note else more
