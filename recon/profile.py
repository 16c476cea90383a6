"""What keeping ``k`` channels of each unit costs on the network's output: the profile.

``recon.prune(..., allocation="auto")`` chooses the channel counts from this profile
(:func:`recon.allocate.allocate`). For every unit to be allocated:

1. **Layer error curve.** One forward pass of the *original* network over the
   calibration images gives every unit's consumer statistics at once
   (:func:`recon.gather.accumulate_all`; units whose statistics do not fit the cache
   budget together take a pass per run of units). From them come the channel problem
   ``A, b``, the method's nested order (:func:`recon.select.channel_order`) and the
   relative error ``e_u(k)`` of the consumer's output when only the first ``k``
   channels of the order are kept and the consumer is re-fitted as ``reconstruct``
   does, for every allowed ``k`` (:func:`recon.allocate.count_grid`), as expected on
   samples the fit did not see: :func:`~recon.allocate.lstsq_error_curve` for the
   least-squares modes, :func:`~recon.allocate.scale_error_curve` for ``"scale"`` and
   for consumers too wide for patch statistics, and the error of the original weights
   for ``"none"``.
2. **Sensitivity.** A layer's error is not comparable across layers. The unit alone
   is pruned at its *probe* count ``p_u`` (the uniform count, or fewer channels if the
   layer loses almost nothing there), re-fitted by one least-squares solve, and the
   relative output error ``o_u = ‖f'(x) − f(x)‖² / ‖f(x)‖²`` that this causes is
   estimated to first order for every unit from one forward and one backward pass of
   the first ``SENSITIVITY_IMAGES`` calibration images (:mod:`recon.sensitivity`),
   with the probe's own layer error ``ẽ_u`` on the same images and positions:
   ``s_u = o_u / ẽ_u``. (``sensitivity="probe"``, the older way kept for comparison,
   prunes a copy per unit and runs ``HELDOUT_IMAGES`` held-out images through it.)
3. **Cost.** ``c_u(k) = s_u · e_u(k)``: the predicted output error of keeping ``k``
   channels, assuming it is proportional to the layer's error and that the units'
   errors add.
4. **Trust.** Where the re-fit at the uniform count has nearly as many unknowns per
   output ``p`` as the statistics have samples ``N`` (few calibration images, wide
   layers), curve and sensitivity measure the fit's luck more than the layer: the
   unit may move from its uniform count only a fraction ``trust = 1 − p/N`` of the way
   to either end of its grid (:func:`trust`, :attr:`UnitProfile.allowed`).

This module sees the original network, its trace and the calibration batches; it
changes neither (the sensitivities come from hooks removed afterwards, the older
probes prune copies).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from . import distributed as _dist
from ._progress import progress_bar
from ._timing import PhaseTimer
from .allocate import count_grid, lstsq_error_curve, scale_error_curve
from .gather import CV_FOLDS, accumulate_all, stats_bytes, stats_tensors
from .graph import Unit, called
from .groups import group_slices, quota_order
from .layers import SampledConv2d, head_outputs
from .refit import gate_fit
from .sampling import _mix, layer_key
from .scores import channel_scores
from .select import SCORE_METHODS, channel_order, obs_shared
from .sensitivity import Delta, linearised_output_errors
from .solve import LSTSQ_MODES, cv_lstsq, kept_taps, lstsq, scale
from .stats import ChannelStats, GroupedStats, PatchStats
from .surgery import channel_offset, consumer_weight, prune_unit

__all__ = ["HELDOUT_IMAGES", "SENSITIVITIES", "Profile", "UnitProfile", "profile_units"]

#: Calibration images kept out of the statistics to measure each unit's sensitivity.
HELDOUT_IMAGES = 64
#: How a unit's sensitivity is measured (``profile_units(sensitivity=...)``).
SENSITIVITIES = ("gradient", "probe")
#: A probe moves to fewer channels until the layer's error is at least this.
MIN_PROBE_ERROR = 1e-4
# The profile follows a LASSO path for at most this many channels; the rest enter in the
# order of the fallback score (select.lasso_order). sklearn's LARS costs about c·k² for k
# steps: a whole 2,048-channel path (ResNet-50's residual stream) took 24 s on one core,
# 512 steps of it 2 s. Pruning itself never follows a whole path (select.lasso solves at
# the count), so only the profile's predicted curves beyond 512 channels change.
LASSO_ORDER_STEPS = 512


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
    uniform : int
        The unit's count under the uniform split (0: not known).
    trust : float in [0, 1]
        How far the allocation may move the unit from ``uniform``
        (:func:`trust`): 1 anywhere on its grid, 0 not at all.
    """

    counts: Tensor
    layer_error: Tensor
    probe: int
    output_error: float
    sensitivity: float
    uniform: int = 0
    trust: float = 1.0

    @property
    def cost(self) -> Tensor:
        """Predicted output error at each count: ``sensitivity * layer_error``."""
        return self.sensitivity * self.layer_error

    @property
    def allowed(self) -> Tensor:
        """Which of ``counts`` the allocation may choose, (m,) bool: those within
        ``trust`` of the way from ``uniform`` to either end of the grid, and always
        the count nearest ``uniform``."""
        counts = self.counts
        if self.uniform <= 0 or self.trust >= 1:
            return torch.ones_like(counts, dtype=torch.bool)
        u, t = float(self.uniform), max(self.trust, 0.0)
        lo = u - t * (u - float(counts[0]))
        hi = u + t * (float(counts[-1]) - u)
        ok = (counts >= lo - 1e-9) & (counts <= hi + 1e-9)
        ok[int(torch.argmin((counts.double() - u).abs()))] = True
        return ok


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
        """``{unit: (counts, costs)}`` on the counts each unit is allowed, as
        :func:`recon.allocate.allocate` takes them."""
        out = {}
        for name, p in self.units.items():
            ok = p.allowed
            out[name] = (p.counts[ok], p.cost[ok.to(p.cost.device)])
        return out


def trust(samples: int, unknowns: int) -> float:
    """How much a unit's profile can move its count away from the uniform split.

    ``1 − p / N`` for ``N`` samples behind its statistics and ``p`` unknowns per output
    of its re-fit at the uniform count, clipped to [0, 1]: least squares' expected error
    on samples it was not fitted to is about ``(N + p) / (N − p)`` times its error on
    its own, so where ``p`` nears ``N`` the error curve and the sensitivity measure the
    fit's luck more than the layer. With few calibration images the wide layers' counts
    stay near the uniform split; with many, the allocation is free.
    """
    if samples <= 0:
        return 0.0
    return min(max(1.0 - unknowns / samples, 0.0), 1.0)


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
        max_active=LASSO_ORDER_STEPS
        if method == "lasso" and A.shape[0] > LASSO_ORDER_STEPS
        else None,
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


def _probe_fit(stats, A, b, keep: Tensor, w_cons: Tensor, mode: str, *, cv: bool = True):
    """The consumer's re-fitted weight and bias change for ``keep``, as pruning will fit it
    (``cv=False``: ``"lstsq"`` without the cross-validated ridge, one solve)."""
    if mode == "lstsq" and isinstance(stats, PatchStats) and cv:
        fit = cv_lstsq(stats, keep, w_cons.double())
        return fit.weight, fit.bias_delta
    if mode in LSTSQ_MODES and isinstance(stats, PatchStats):
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
    sensitivity: str = "gradient",
) -> Profile:
    """Profile ``units`` of the (eval-mode) ``original`` network; see the module docstring.

    ``uniform`` gives each unit's uniform count (its probe unless the layer loses less
    than ``MIN_PROBE_ERROR`` there). ``sensitivity``: ``"gradient"`` (the default) from
    one backward pass (:mod:`recon.sensitivity`), the statistics from every image;
    ``"probe"`` the older per-unit probe on ``HELDOUT_IMAGES`` held-out images (kept to
    compare the two). In a distributed run the statistics and the sums behind the output
    errors are summed over ranks, so every rank computes the same profile.
    """
    if sensitivity not in SENSITIVITIES:
        raise ValueError(
            f"The 'sensitivity' argument must be one of {SENSITIVITIES}. Got {sensitivity!r}."
        )
    total = sum(b.shape[0] for b in batches)
    if ctx is not None:  # the held-out images are the last of the whole calibration set
        total = int(ctx.sum([total], "calibration image count")[0])
    gradient = sensitivity == "gradient"
    if gradient:  # every image for the statistics; the sensitivities need none held out
        held, fit, fit_offsets, x_held = 0, batches, offsets, None
    else:
        held = min(HELDOUT_IMAGES, total // 5)
        fit, fit_offsets, x_held = _split(batches, offsets, total - held)
        if held == 0 and batches:  # too few images to hold any out: measure on the fitted ones
            x_held = torch.cat(batches)[:HELDOUT_IMAGES]
    timer = PhaseTimer()  # the caller charges all of it to "profile"
    folds = CV_FOLDS if reconstruct == "lstsq" and not gradient else 1
    measured: dict[str, _Measured] = {}
    zeros = method == "apoz"  # the channels' zeros are only needed for APoZ scores
    with torch.no_grad():
        ref = _flat_output(original(x_held)) if x_held is not None else None
        starts = {c[0].name: c for c in _chunks(units, original, folds, cache_bytes)}
        all_stats: dict = {}
        bar = progress_bar(units, desc="profile", disable=not show, unit="layer", log="each")
        for unit in bar:
            bar.set_postfix_str(unit.name)
            if unit.name in starts:  # one pass of the original for the whole run of units
                all_stats = accumulate_all(
                    starts[unit.name], gm_o, fit, fit_offsets, samples_per_image=samples_per_image,
                    seed=seed, folds=folds, block_dtype=block_dtype, zeros=zeros, timer=timer,
                )  # fmt: skip
            stats = all_stats.pop(unit.name)
            if ctx is not None:
                ctx.all_reduce_(stats_tensors(stats), f"profile of {unit.name}")
            m = _profile_one(
                unit, stats, original, uniform[unit.name], method=method,
                reconstruct=reconstruct, round_to=round_to, seed=seed, cv=not gradient,
            )  # fmt: skip
            m = m._replace(
                uniform=uniform[unit.name], trust=_trust(unit, stats, uniform, reconstruct)
            )
            if not gradient:  # the probe: the unit alone pruned in a copy, on held-out images
                m = m._replace(output_error=_probe_error(original, m, x_held, ref, ctx, unit))
            measured[unit.name] = m._replace(prune=None)
            del stats, m
    images = held
    if gradient:
        reduce = None
        if ctx is not None:

            def reduce(ts: list[Tensor]) -> list[Tensor]:
                ctx.all_reduce_(ts, "output sensitivities")
                return ts

        todo = {n: m.deltas for n, m in measured.items() if m.deltas}
        errors, layer, images = linearised_output_errors(
            original, todo, batches, _flat_output, offsets=offsets, seed=seed, reduce=reduce
        )
        measured = {
            n: m._replace(output_error=errors.get(n, 0.0), fitted_error=layer.get(n))
            for n, m in measured.items()
        }
    out = {n: _unit_profile(m, gradient) for n, m in measured.items()}
    return Profile(out, total - held, images)


class _Measured(NamedTuple):
    """A unit's curve and its probe, before (or after) the probe's output error is known."""

    counts: Tensor
    err: Tensor
    probe: int
    deltas: list[tuple[str, Delta]]  # how the probe changes each module's output
    prune: Callable[[nn.Module], None] | None  # prunes a copy of the network as the probe
    output_error: float = 0.0
    fitted_error: float | None = None  # the probe's layer error where output_error was measured
    uniform: int = 0
    trust: float = 1.0


def _trust(unit: Unit, stats, uniform: dict[str, int], reconstruct: str) -> float:
    """:func:`trust` of ``unit``: its least-squares re-fit's unknowns per output at the
    uniform count (the most of its readers') against its samples. Other re-fits have
    one unknown per channel: trusted."""
    if reconstruct not in LSTSQ_MODES:
        return 1.0
    k = uniform[unit.name]
    p = max(k // r.groups * r.taps + 1 for r in (unit, *unit.readers))
    return trust(int(stats.count), p)


def _chunks(units: Sequence[Unit], model: nn.Module, folds: int, budget: int) -> list[list[Unit]]:
    """``units`` in order, in runs whose statistics fit ``budget`` bytes together (at least
    one unit each): each run costs one pass of the calibration images."""
    out: list[list[Unit]] = []
    held = 0
    for u in units:
        size = stats_bytes(u, model, folds)
        if not out or held + size > budget:
            out.append([])
            held = 0
        out[-1].append(u)
        held += size
    return out


def _probe_error(original, m: _Measured, x_held, ref, ctx, unit) -> float:
    sums = [0.0, 0.0]
    if m.prune is not None and ref is not None:
        net = copy.deepcopy(original)
        m.prune(net)
        sums = _output_error(net, x_held, ref)
        del net
    if ctx is not None:
        sums = ctx.sum(sums, f"sensitivity of {unit.name}")
    return sums[0] / sums[1] if sums[1] > 0 else 0.0


def _unit_profile(m: _Measured, gradient: bool) -> UnitProfile:
    """The unit's profile. With the ``"gradient"`` sensitivity the output error is measured
    on every position of the first calibration images, partly ones the fit saw, so it is
    compared with the probe's layer error measured in the same pass on the same
    positions; the curve (the error expected on other samples) stays the cost."""
    at_probe = float(m.err[m.counts == m.probe][0])
    if gradient and m.fitted_error is not None:
        at_probe = m.fitted_error
    sensitivity = m.output_error / at_probe if at_probe > 0 else 0.0
    return UnitProfile(m.counts, m.err, m.probe, m.output_error, sensitivity, m.uniform, m.trust)


def _profile_one(
    unit: Unit,
    stats: PatchStats | ChannelStats | GroupedStats,
    original: nn.Module,
    uniform: int,
    *,
    method: str,
    reconstruct: str,
    round_to: int,
    seed: int,
    cv: bool,
) -> _Measured:
    """The unit's error curve and its probe (re-fitted with the cross-validated ridge if
    ``cv``, else with one solve), as output perturbations and as a pruning of a copy."""
    counts = count_grid(unit.width, math.lcm(round_to, unit.step))
    scores = channel_scores(method, unit, original, stats) if method in SCORE_METHODS else None
    if unit.readers:
        return _profile_shared(
            unit, stats, original, uniform, counts, scores,
            method=method, reconstruct=reconstruct, seed=seed, cv=cv,
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
    if probe >= unit.width:
        return _Measured(counts, err, probe, [], None)
    keeps = [p.order[: probe // G].sort().values for p in parts]
    fits = [
        _probe_fit(p.stats, p.A, p.b, k, p.weight, reconstruct, cv=cv)
        for p, k in zip(parts, keeps, strict=True)
    ]
    cpg = unit.width // G
    keep = torch.cat([k.cpu() + g * cpg for g, k in enumerate(keeps)])
    weight = bias_delta = None
    if fits[0][0] is not None:  # (n, m*k): each group's rows, its kept channels' columns
        weight = torch.cat([w.reshape(w.shape[0], -1) for w, _ in fits])
    if fits[0][1] is not None:
        bias_delta = torch.cat([d for _, d in fits])
    gate = gate_fit(unit, stats, keep, original, reconstruct)
    dense = weight if G == 1 or weight is None else _block_diagonal(fits, probe // G, unit.taps)
    deltas = [(called(unit), _consumer_delta(original, unit, keep, dense, bias_delta))]
    if gate is not None:
        deltas.append(
            (unit.gate[0], _conv1x1_delta(original.get_submodule(unit.gate[0]), keep, *gate))
        )

    def prune(net: nn.Module) -> None:
        prune_unit(net, unit, keep, weight=weight, bias_delta=bias_delta, gate=gate)

    return _Measured(counts, err, probe, deltas, prune)


def _block_diagonal(fits, per_group: int, taps: int) -> Tensor:
    """Groups' re-fitted weights (each (n_g, per_group*taps)) as one dense (n, m*taps)."""
    G = len(fits)
    rows = [w.reshape(w.shape[0], per_group, taps) for w, _ in fits]
    n = sum(r.shape[0] for r in rows)
    out = rows[0].new_zeros(n, G * per_group, taps)
    at = 0
    for g, r in enumerate(rows):
        out[at : at + r.shape[0], g * per_group : (g + 1) * per_group] = r
        at += r.shape[0]
    return out.reshape(n, -1)


def _profile_shared(
    unit, stats, original, uniform, counts, scores, *, method, reconstruct, seed, cv
) -> _Measured:
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
    if probe >= unit.width:
        return _Measured(counts, err, probe, [], None)
    keep = order[:probe].sort().values.cpu()
    fits = [_probe_fit(p.stats, p.A, p.b, keep, p.weight, reconstruct, cv=cv) for p in parts]
    weights = [None if w is None else w.reshape(w.shape[0], -1) for w, _ in fits]
    biases = [d for _, d in fits]
    deltas = [
        (called(r), _consumer_delta(original, r, keep, w, d))
        for r, w, d in zip(readers, weights, biases, strict=True)
    ]

    def prune(net: nn.Module) -> None:
        prune_unit(net, unit, keep, weight=weights, bias_delta=biases)

    return _Measured(counts, err, probe, deltas, prune)


def _consumer_delta(
    model: nn.Module, unit: Unit, keep: Tensor, weight: Tensor | None, bias_delta: Tensor | None
) -> Delta:
    """``δ(x, y)``: how the consumer's output ``y`` changes when it reads only the unit's
    ``keep`` channels of its input ``x`` with ``weight`` (n, m*k; None: its original
    weights on them) and its bias moved by ``bias_delta``; and, as the reference of the
    layer's error, the unit's channels' part of ``y`` (``y`` less the bias, and less
    what the other channels of a concatenation give)."""
    consumer = model.get_submodule(unit.consumer)
    offset = channel_offset(model, unit)
    w_unit = consumer_weight(consumer, unit, offset)  # (n, width, k), dense if grouped
    n, k = w_unit.shape[0], unit.taps
    keep = keep.to(w_unit.device)
    w_new = (w_unit[:, keep] if weight is None else weight.reshape(n, len(keep), k)).detach()
    beta = None if bias_delta is None else bias_delta.detach()
    bias = None if consumer.bias is None else consumer.bias.detach()
    if isinstance(consumer, nn.Conv2d):
        shape = consumer.weight.shape[2:]
        w_old = w_unit.reshape(n, unit.width, *shape)
        w_new = w_new.reshape(n, len(keep), *shape)

        def run(x: Tensor, w: Tensor) -> Tensor:
            return _conv(consumer, x, w.to(x.dtype))

        def delta(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            if isinstance(consumer, SampledConv2d):  # (an already pruned network)
                x = consumer.sampler(x)
            xu = x[:, offset : offset + unit.width]
            if xu.shape[1] == x.shape[1] and bias is None:  # the unit's part: all of y
                ref = y
            elif xu.shape[1] == x.shape[1]:
                ref = y - bias.to(y)[None, :, None, None]
            else:  # a concatenation's slice: its own part of y
                ref = run(xu, w_old.to(x.device))
            d = run(xu.index_select(1, keep.to(x.device)), w_new.to(x.device)) - ref
            if beta is not None:
                d += beta.to(d)[None, :, None, None]
            return d, ref

        return delta

    rows = kept_taps(keep, k)
    attn = model.get_submodule(unit.producer) if unit.consumer_kind == "heads" else None

    def delta_linear(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if attn is not None:  # the attention layer's input: what its heads give
            x = head_outputs(attn, x)
        xu = x[..., offset * k : (offset + unit.width) * k]
        ref = xu @ w_unit.reshape(n, -1).to(x).T
        d = xu.index_select(-1, rows.to(x.device)) @ w_new.reshape(n, -1).to(x).T - ref
        return (d + beta.to(d) if beta is not None else d), ref

    return delta_linear


def _conv1x1_delta(conv: nn.Conv2d, keep: Tensor, weight: Tensor, bias_delta: Tensor) -> Delta:
    """``δ`` of a squeeze conv (a gate's fc1) re-fitted on the kept channels."""
    n = conv.out_channels
    w_old = conv.weight.detach().reshape(n, -1)
    w_new, beta = weight.reshape(n, -1).detach(), bias_delta.detach()

    def delta(x: Tensor, y: Tensor) -> tuple[Tensor, None]:
        p = x.reshape(x.shape[0], -1)  # (B, c): the pooled channels
        d = p.index_select(1, keep.to(x.device)) @ w_new.to(p).T - p @ w_old.to(p).T
        return (d + beta.to(d)).reshape(y.shape), None  # the gate: not the layer's error

    return delta


def _conv(conv: nn.Conv2d, x: Tensor, w: Tensor) -> Tensor:
    """``conv`` applied with weight ``w`` (dense: one group), no bias."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv2d(x, w, None, conv.stride, 0, conv.dilation)
    return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation)
