"""What keeping ``k`` channels of each unit costs on the network's output: the profile.

``recon.prune(..., allocation="auto")`` chooses the channel counts from this profile
(:func:`recon.allocate.allocate`). For every unit to be allocated:

1. **Layer error curve.** One pass of the *original* network over the calibration
   images (:class:`recon.passes.Passes`, both sides the original: about two forward
   passes in all) gives the unit's consumer statistics. From them come the channel
   problem ``A, b``, the method's nested order (:func:`recon.select.channel_order`)
   and the relative error ``e_u(k)`` of the consumer's output when only the first
   ``k`` channels of the order are kept and the consumer is re-fitted as
   ``reconstruct`` does, for every allowed ``k`` (:func:`recon.allocate.count_grid`):
   :func:`~recon.allocate.lstsq_error_curve` for the least-squares modes,
   :func:`~recon.allocate.scale_error_curve` for ``"scale"`` and for consumers too
   wide for patch statistics, and the error of the original weights for ``"none"``.
2. **Sensitivity.** A layer's error is not comparable across layers. The unit alone
   is pruned at its *probe* count ``p_u`` (the uniform count, or fewer channels if the
   layer loses almost nothing there) in a copy of the original network, with the
   re-fit of step 1, and the relative output error ``o_u = ‖f'(x) − f(x)‖² / ‖f(x)‖²``
   is measured on ``HELDOUT_IMAGES`` calibration images that step 1 did not see.
   ``s_u = o_u / e_u(p_u)``.
3. **Cost.** ``c_u(k) = s_u · e_u(k)``: the predicted output error of keeping ``k``
   channels, assuming it is proportional to the layer's error and that the units'
   errors add.

This module sees the original network, its trace and the calibration batches; it
changes neither (the probes prune copies).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, fx, nn

from . import distributed as _dist
from ._progress import progress_bar
from ._timing import PhaseTimer
from .allocate import count_grid, lstsq_error_curve, scale_error_curve
from .gather import CV_FOLDS, _accumulate, stats_tensors
from .graph import Unit
from .groups import group_slices, quota_order
from .passes import Passes
from .refit import gate_fit
from .sampling import _mix, layer_key
from .scores import channel_scores
from .select import SCORE_METHODS, channel_order, obs_shared
from .solve import LSTSQ_MODES, cv_lstsq, lstsq, scale
from .stats import ChannelStats, GroupedStats, PatchStats
from .surgery import channel_offset, consumer_weight, prune_unit

__all__ = ["HELDOUT_IMAGES", "Profile", "UnitProfile", "profile_units"]

#: Calibration images kept out of the statistics to measure each unit's sensitivity.
HELDOUT_IMAGES = 64
#: A probe moves to fewer channels until the layer's error is at least this.
MIN_PROBE_ERROR = 1e-4


@dataclass(frozen=True)
class UnitProfile:
    """One unit's predicted cost of keeping each allowed count.

    Attributes
    ----------
    counts : Tensor, shape (m,), int64
        The counts the unit may keep (:func:`recon.allocate.count_grid`).
    layer_error : Tensor, shape (m,), float64
        Relative error of the consumer's output at each count, re-fitted.
    probe : int
        The count at which the sensitivity was measured.
    output_error : float
        Relative output error of the network with this unit alone pruned to ``probe``.
    sensitivity : float
        ``output_error / layer_error`` at the probe.
    """

    counts: Tensor
    layer_error: Tensor
    probe: int
    output_error: float
    sensitivity: float

    @property
    def cost(self) -> Tensor:
        """Predicted output error at each count: ``sensitivity * layer_error``."""
        return self.sensitivity * self.layer_error


@dataclass(frozen=True)
class Profile:
    """The profile of a network's units: :class:`UnitProfile` per unit name.

    Attributes
    ----------
    units : dict of str to UnitProfile
    images : int
        Calibration images behind the statistics (over every process).
    heldout : int
        Images the sensitivities were measured on (over every process).
    """

    units: dict[str, UnitProfile]
    images: int
    heldout: int

    def curves(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{unit: (counts, costs)}``, as :func:`recon.allocate.allocate` takes them."""
        return {name: (p.counts, p.cost) for name, p in self.units.items()}


def _split(batches: list[Tensor], offsets: list[int], first_held: int):
    """The batches without the images of global index >= ``first_held`` (and their
    offsets), and those images (None if none): the same split whichever process holds
    which images (a process may hold none)."""
    fit, fit_offsets, tail = [], [], []
    for b, off in zip(batches, offsets, strict=True):
        n = min(b.shape[0], max(first_held - off, 0))
        if n:
            fit.append(b[:n])
            fit_offsets.append(off)
        if n < b.shape[0]:
            tail.append(b[n:])
    return fit, fit_offsets, torch.cat(tail) if tail else None


class _Group(NamedTuple):
    """One group's problem in a grouped consumer's profile (or the whole unit's)."""

    stats: PatchStats | ChannelStats
    A: Tensor
    b: Tensor
    order: Tensor  # the method's nested order of its channels
    weight: Tensor  # (n_group, c_group, k) consumer weight


def _order(A: Tensor, b: Tensor, stats, scores, method, seed, mode, key: str) -> Tensor:
    return channel_order(
        method,
        A=A,
        b=b,
        scores=scores,
        width=A.shape[0],
        seed=_mix(seed, layer_key(key)),
        stats=stats if mode in LSTSQ_MODES else None,  # obs: its re-fit's error
    ).to(A.device)


def _curve(stats, A, b, order, counts, mode: str) -> Tensor:
    """Relative layer error at each count, as expected on images the fit did not see.

    The least-squares errors of :func:`~recon.allocate.lstsq_error_curve` are measured on
    the samples the fit was made from, and shrink with the number of unknowns ``p = k·taps
    + 1`` even where nothing generalises: with ``N`` samples, ordinary least squares'
    expected held-out error is about ``(N + p) / (N − p)`` times its in-sample error.
    Scaled so, the curve is comparable across layers of different widths. For
    ``"lstsq"`` it is capped by the scale fit's error (which ``cv_lstsq`` can fall back to,
    and whose ``k`` unknowns per output do not over-fit); for ``"lstsq_plain"`` a count
    with ``p >= N`` (interpolation) costs a relative error of 1. Never increasing in ``k``.
    """
    if mode in LSTSQ_MODES and isinstance(stats, PatchStats):
        err = lstsq_error_curve(stats, order, counts)
        n = float(stats.count)
        p = counts.to(err.device, torch.float64) * stats.taps + 1
        optimism = torch.where(p < n, (n + p) / (n - p).clamp_min(1), torch.inf)
        err = err * optimism
        if mode == "lstsq":
            err = torch.minimum(err, scale_error_curve(A, b, stats.yy, order, counts))
        err = torch.where(torch.isfinite(err), err, torch.ones_like(err))
        return err.cummin(0).values  # keeping more channels never costs more
    if mode != "none":
        return scale_error_curve(A, b, stats.yy, order, counts)
    # Original weights: ‖Y‖² − 2 Σ_S b + Σ_{S×S} A for each prefix S of the order.
    P = A[order][:, order]
    block = P.cumsum(0).cumsum(1).diagonal()  # (c,) sums of the leading k × k blocks
    err = float(stats.yy) - 2 * b[order].cumsum(0) + block
    yy = float(stats.yy)
    rel = (err / yy).clamp_min(0) if yy > 0 else torch.zeros_like(err)
    return rel[counts.to(rel.device) - 1].to(torch.float64)


def _probe_fit(stats, A, b, keep: Tensor, w_cons: Tensor, mode: str):
    """The consumer's re-fitted weight and bias change for ``keep``, as pruning will fit it."""
    if mode == "lstsq" and isinstance(stats, PatchStats):
        fit = cv_lstsq(stats, keep, w_cons.double())
        return fit.weight, fit.bias_delta
    if mode == "lstsq_plain" and isinstance(stats, PatchStats):
        return lstsq(stats, keep, fit_bias=True)
    if mode == "none":
        return None, None
    s = scale(A, b, keep)
    return w_cons[:, keep.to(w_cons.device)].double() * s.to(w_cons.device)[None, :, None], None


def _probe_count(counts: Tensor, err: Tensor, uniform: int) -> int:
    """The uniform count, or the largest smaller count where the layer loses enough."""
    ok = (counts <= uniform) & (err.to(counts.device) >= MIN_PROBE_ERROR)
    if bool(ok.any()):
        return int(counts[ok].max())
    return int(counts[0])


def _flat_output(out) -> Tensor:
    """A model's output as one float64 vector per image: its tensors (in tuples, lists or
    dicts, as detection or multi-head models return them) flattened and concatenated."""
    leaves = []

    def visit(obj) -> None:
        if isinstance(obj, Tensor):
            leaves.append(obj.double().reshape(obj.shape[0] if obj.dim() else 1, -1))
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                visit(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item)

    visit(out)
    if not leaves:
        raise TypeError(
            "allocation='auto' measures the network's output, which must hold tensors "
            f"(a tensor, or tuples, lists or dicts of them). Got {type(out).__name__}; "
            "pass allocation='uniform'."
        )
    return torch.cat(leaves, dim=1) if len(leaves) > 1 else leaves[0]


def _output_error(model: nn.Module, x: Tensor, ref: Tensor) -> list[float]:
    out = _flat_output(model(x))
    return [float(((out - ref) ** 2).sum()), float((ref**2).sum())]


def profile_units(
    original: nn.Module,
    gm_o: fx.GraphModule,
    units: Sequence[Unit],
    batches: list[Tensor],
    offsets: list[int],
    uniform: dict[str, int],
    *,
    method: str,
    reconstruct: str,
    round_to: int,
    samples_per_image: int | None,
    seed: int,
    cache_bytes: int,
    block_dtype: torch.dtype = torch.float64,
    ctx: _dist.Context | None = None,
    show: bool = False,
) -> Profile:
    """Profile ``units`` of the (eval-mode) ``original`` network; see the module docstring.

    ``uniform`` gives each unit's uniform count (its probe unless the layer loses less
    than ``MIN_PROBE_ERROR`` there). In a distributed run the statistics and the output
    errors are summed over ranks, so every rank computes the same profile.
    """
    total = sum(b.shape[0] for b in batches)
    if ctx is not None:  # the held-out images are the last of the whole calibration set
        total = int(ctx.sum([total], "calibration image count")[0])
    held = min(HELDOUT_IMAGES, total // 5)
    fit, fit_offsets, x_held = _split(batches, offsets, total - held)
    if held == 0 and batches:  # too few images to hold any out: measure on the fitted ones
        x_held = torch.cat(batches)[:HELDOUT_IMAGES]
    timer = PhaseTimer()  # the caller charges all of it to "profile"
    with torch.no_grad():
        ref = _flat_output(original(x_held)) if x_held is not None else None
        passes = Passes(
            gm_o, gm_o, fit, list(units), {u.name: None for u in units}, [],
            samples_per_image=samples_per_image, seed=seed, cache_bytes=cache_bytes,
            final=False, timer=timer, image_offsets=fit_offsets,
        )  # fmt: skip
        out: dict[str, UnitProfile] = {}
        bar = progress_bar(units, desc="profile", disable=not show, unit="layer", log="each")
        for step, unit in enumerate(bar):
            bar.set_postfix_str(unit.name)
            stats = _accumulate(
                unit, gm_o, gm_o, fit, target=None, samples_per_image=samples_per_image,
                seed=seed, progress=False, passes=passes, step=step, timer=timer,
                folds=CV_FOLDS if reconstruct == "lstsq" else 1, block_dtype=block_dtype,
            )  # fmt: skip
            passes.drop_targets(step)
            passes.kept(step, None)  # the profiled network is never pruned
            if ctx is not None:
                ctx.all_reduce_(stats_tensors(stats), f"profile of {unit.name}")
            out[unit.name] = _profile_one(
                unit, stats, original, x_held, ref, uniform[unit.name],
                method=method, reconstruct=reconstruct, round_to=round_to, seed=seed, ctx=ctx,
            )  # fmt: skip
            del stats
        del passes
    return Profile(out, total - held, held)


def _profile_one(
    unit: Unit,
    stats: PatchStats | ChannelStats | GroupedStats,
    original: nn.Module,
    x_held: Tensor | None,
    ref: Tensor | None,
    uniform: int,
    *,
    method: str,
    reconstruct: str,
    round_to: int,
    seed: int,
    ctx: _dist.Context | None,
) -> UnitProfile:
    counts = count_grid(unit.width, math.lcm(round_to, unit.step))
    scores = channel_scores(method, unit, original, stats) if method in SCORE_METHODS else None
    if unit.readers:
        return _profile_shared(
            unit, stats, original, x_held, ref, uniform, counts, scores,
            method=method, reconstruct=reconstruct, seed=seed, ctx=ctx,
        )  # fmt: skip
    consumer = original.get_submodule(unit.consumer)
    # (n, c, k): block diagonal when grouped, the unit's slice when concatenated
    w_cons = consumer_weight(consumer, unit, channel_offset(original, unit))
    G = unit.groups
    parts = []  # each group's problem, or the whole unit's
    for g, (chans, outs) in enumerate(group_slices(unit.width, w_cons.shape[0], G)):
        sub = stats.subset(chans, outs) if G > 1 else stats
        A, b = sub.channel_problem(w_cons[outs, chans])
        key = f"{unit.name}/{g}" if G > 1 else unit.name
        s = None if scores is None else scores[chans]
        order = _order(A, b, sub, s, method, seed, reconstruct, key)
        order = quota_order(order, unit.width, unit.producer_groups)
        parts.append(_Group(sub, A, b, order, w_cons[outs, chans]))
    errs = torch.stack(
        [_curve(p.stats, p.A, p.b, p.order, counts // G, reconstruct).cpu() for p in parts]
    )
    yy = torch.tensor([float(p.stats.yy) for p in parts], dtype=torch.float64)
    err = errs[0] if G == 1 else (errs * yy[:, None]).sum(0) / yy.sum().clamp_min(1e-300)
    probe = _probe_count(counts, err, uniform)
    sums = [0.0, 0.0]
    if probe < unit.width and ref is not None:
        keeps = [p.order[: probe // G].sort().values for p in parts]
        fits = [
            _probe_fit(p.stats, p.A, p.b, k, p.weight, reconstruct)
            for p, k in zip(parts, keeps, strict=True)
        ]
        cpg = unit.width // G
        keep = torch.cat([k.cpu() + g * cpg for g, k in enumerate(keeps)])
        weight = bias_delta = None
        if fits[0][0] is not None:
            weight = torch.cat([w.reshape(w.shape[0], -1) for w, _ in fits])
        if fits[0][1] is not None:
            bias_delta = torch.cat([d for _, d in fits])
        gate = gate_fit(unit, stats, keep, original, reconstruct)
        net = copy.deepcopy(original)
        prune_unit(net, unit, keep, weight=weight, bias_delta=bias_delta, gate=gate)
        sums = _output_error(net, x_held, ref)
        del net
    return _unit_profile(unit, counts, err, probe, sums, ctx)


def _unit_profile(unit, counts, err, probe, sums, ctx) -> UnitProfile:
    if ctx is not None:
        sums = ctx.sum(sums, f"sensitivity of {unit.name}")
    output_error = sums[0] / sums[1] if sums[1] > 0 else 0.0
    at_probe = float(err[counts == probe][0])
    sensitivity = output_error / at_probe if at_probe > 0 else 0.0
    return UnitProfile(counts, err, probe, output_error, sensitivity)


def _profile_shared(
    unit, stats, original, x_held, ref, uniform, counts, scores, *, method, reconstruct, seed, ctx
) -> UnitProfile:
    """:func:`_profile_one` for a unit with several readers: one order for all of them
    (as :func:`recon.refit._prune_shared` chooses), each reader's error curve along it,
    averaged with weights ``‖Y_r‖²``; the probe re-fits every reader."""
    readers = (unit, *unit.readers)
    parts = []
    for r, st in zip(readers, [stats, *stats.readers], strict=True):
        w = consumer_weight(original.get_submodule(r.consumer), r, channel_offset(original, r))
        A, b = st.channel_problem(w)
        parts.append(_Group(st, A, b, None, w))
    yy = torch.tensor([float(p.stats.yy) for p in parts], dtype=torch.float64)
    norm = [float(v) if v > 0 else 1.0 for v in yy]
    A = sum(p.A / v for p, v in zip(parts, norm, strict=True))
    b = sum(p.b / v for p, v in zip(parts, norm, strict=True))
    if (
        method == "obs"
        and reconstruct in LSTSQ_MODES
        and all(isinstance(p.stats, PatchStats) for p in parts)
    ):  # on the readers' re-fitted errors, as pruning chooses
        order = obs_shared([p.stats for p in parts], [1.0 / v for v in norm]).to(A.device)
    else:
        order = _order(A, b, None, scores, method, seed, "none", unit.name)
    order = quota_order(order, unit.width, unit.producer_groups)
    errs = torch.stack([_curve(p.stats, p.A, p.b, order, counts, reconstruct).cpu() for p in parts])
    err = (errs * yy[:, None]).sum(0) / yy.sum().clamp_min(1e-300)
    probe = _probe_count(counts, err, uniform)
    sums = [0.0, 0.0]
    if probe < unit.width and ref is not None:
        keep = order[:probe].sort().values
        fits = [_probe_fit(p.stats, p.A, p.b, keep, p.weight, reconstruct) for p in parts]
        weights = [None if w is None else w.reshape(w.shape[0], -1) for w, _ in fits]
        net = copy.deepcopy(original)
        prune_unit(net, unit, keep.cpu(), weight=weights, bias_delta=[d for _, d in fits])
        sums = _output_error(net, x_held, ref)
        del net
    return _unit_profile(unit, counts, err, probe, sums, ctx)
