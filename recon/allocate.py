"""How many channels each unit keeps: error curves and the global solve under a FLOPs target.

Data-driven allocation in three steps:

1. a selection method's nested order of channels, which channel it keeps first,
   second, ... (:func:`recon.select.channel_order`);
2. the relative error of keeping the first ``k`` channels of that order, for every
   allowed ``k`` at once: one Cholesky factorisation of the permuted Gram serves every
   prefix (:func:`scale_error_curve` from the channel problem, :func:`lstsq_error_curve`
   from the patch statistics);
3. the counts that minimise the summed cost of all units under a FLOPs target
   (:func:`allocate`), with FLOPs predicted by the model of :mod:`recon.budget`.

This module sees tensors and numbers only, never modules.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import budget as _budget
from .budget import BudgetUnit
from .solve import kept_taps
from .stats import PatchStats

__all__ = [
    "Allocation",
    "allocate",
    "cost_at",
    "count_grid",
    "lstsq_error_curve",
    "scale_error_curve",
]

#: Default ``rtol`` of :func:`allocate`: the predicted FLOPs land in
#: ``[(1 - rtol) * target, target]`` whenever the allowed counts can reach that band.
FLOPS_RTOL = 0.02
#: Pair exchange moves try counts within this many grid steps of each unit's current one.
PAIR_WINDOW = 8
#: The budget DP works on at most this many counts per unit ...
DP_MAX_COUNTS = 64
#: ... with the FLOPs the units may use cut into buckets: about ``DP_WORK`` table
#: entries in all, and between ``DP_BUCKETS[0]`` and ``DP_BUCKETS[1]`` buckets.
DP_WORK = 50_000_000
DP_BUCKETS = (1_000, 20_000)
#: The DP's cheapest buckets in the band that are checked with the exact FLOPs.
DP_CANDIDATES = 16
_BISECTION_STEPS = 60
_MAX_MOVES = 100_000
_MAX_SWEEPS = 100
_JITTERS = (1.0, 1e2, 1e4, 1e6)


# ------------------------------------------------------------------------------- grid


def count_grid(width: int, round_to: int = 1, *, max_counts: int | None = None) -> Tensor:
    """The kept counts a unit may take: multiples of ``round_to`` below ``width``, and ``width``.

    Parameters
    ----------
    width : int >= 1
        Channels of the unit.
    round_to : int >= 1, default 1
        Granularity, as in :func:`recon.budget.resolve_channels`: the smallest count is
        ``min(round_to, width)``.
    max_counts : int >= 2, optional
        Keep at most this many counts, evenly spread over the grid (always the smallest
        and ``width``): a coarser grid for wide units makes the global solve cheaper.

    Returns
    -------
    Tensor, shape (m,), int64
        Increasing counts.

    Examples
    --------
    >>> count_grid(10, 4).tolist()
    [4, 8, 10]
    >>> count_grid(64, 1, max_counts=5).tolist()
    [1, 17, 33, 48, 64]
    """
    width = _check_int("width", width, 1)
    round_to = _check_int("round_to", round_to, 1)
    counts = np.append(np.arange(round_to, width, round_to), width)
    if max_counts is not None:
        max_counts = _check_int("max_counts", max_counts, 2)
        if len(counts) > max_counts:
            pick = np.unique(np.round(np.linspace(0, len(counts) - 1, max_counts)).astype(int))
            counts = counts[pick]
    return torch.as_tensor(counts, dtype=torch.int64)


# ------------------------------------------------------------------------ error curves


def scale_error_curve(
    A: Tensor,
    b: Tensor,
    yy: Tensor | float,
    order: Tensor,
    counts: Tensor | Sequence[int] | None = None,
    *,
    ridge: float = 1e-6,
) -> Tensor:
    """Relative error of keeping the first ``k`` channels of ``order``, re-scaled, for every ``k``.

    For the kept set ``S_k = order[:k]``, ThiNet's per-channel scale re-fit
    (:func:`recon.solve.scale`) leaves the error

    .. math::

        e_k = \\min_s \\|Y - \\sum_{i \\in S_k} s_i Z_i\\|^2 / \\|Y\\|^2
            = \\bigl(\\|Y\\|^2 - b_{S_k}^\\top (A_{S_k S_k} + \\varepsilon I)^{-1} b_{S_k}\\bigr)
              / \\|Y\\|^2 ,

    with one ridge ``ε = ridge · mean(diag A)`` for every ``k``. With ``L`` the Cholesky
    factor of the permuted ``A + εI`` and ``z = L⁻¹ b`` (permuted), the leading ``k × k``
    block of ``L`` factors ``A_{S_k S_k} + εI``, so ``e_k = (‖Y‖² − Σ_{j<k} z_j²) / ‖Y‖²``:
    one factorisation, ``O(c³/3)``, gives every ``k``, and the curve never increases.
    The value is the error of the ridge solution plus ``ε‖s‖²`` (an upper bound, tight
    to ``ε``).

    Parameters
    ----------
    A : Tensor, shape (c, c)
        Channel Gram (:func:`recon.stats.channel_gram`).
    b : Tensor, shape (c,)
    yy : Tensor or float
        ``‖Y‖²``.
    order : Tensor, shape (c,)
        A permutation of the channels (:func:`recon.select.channel_order`).
    counts : Tensor or sequence of int, optional
        Kept counts in ``[1, c]``; default every count ``1 .. c``.
    ridge : float >= 0, default 1e-6

    Returns
    -------
    Tensor, shape (len(counts),), float64
        Relative errors, on ``A``'s device.

    Examples
    --------
    >>> Z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> Y = Z.sum(0)  # two copies of one direction and one other
    >>> A, b = Z @ Z.T, Z @ Y
    >>> scale_error_curve(A, b, Y @ Y, torch.tensor([0, 2, 1])).round(decimals=4).tolist()
    [0.2, 0.0, 0.0]
    """
    c = _check_square("A", A)
    b = _check_vector("b", b, c)
    order = _check_order(order, c)
    counts = _check_counts(counts, c)
    ridge = _check_nonneg("ridge", ridge)
    A64 = A.detach().to(torch.float64)
    P = A64[order][:, order]
    eps = ridge * float(A64.diagonal().sum()) / c + 1e-12
    L = _prefix_cholesky(P, eps, "A")
    z = torch.linalg.solve_triangular(L, b.to(L)[order][:, None], upper=False)[:, 0]
    explained = torch.cumsum(z * z, 0)
    return _relative_curve(explained[counts.to(L.device) - 1], yy, L)


def lstsq_error_curve(
    stats: PatchStats,
    order: Tensor,
    counts: Tensor | Sequence[int] | None = None,
    *,
    fit_bias: bool = True,
    ridge: float = 1e-6,
) -> Tensor:
    """Relative error of the least-squares re-fit from the first ``k`` channels of ``order``.

    For the kept set ``S_k = order[:k]`` and its patch taps, the consumer re-fitted by
    least squares (:func:`recon.solve.lstsq`, with the intercept when ``fit_bias``)
    leaves the error

    .. math::

        e_k = \\min_{W, \\beta} \\sum \\|y - W x_{S_k} - \\beta\\|^2 / \\sum \\|y\\|^2
            = \\bigl(\\textstyle\\sum\\|y\\|^2 - \\operatorname{tr}(R_k^\\top M_k^{-1} R_k)\\bigr)
              / \\textstyle\\sum\\|y\\|^2,

    with ``M_k = [[N, s_Sᵀ], [s_S, G_SS + εI]]`` and ``R_k = [tᵀ; C_S]`` (without the
    intercept: ``M_k = G_SS + εI``, ``R_k = C_S``) and one ridge
    ``ε = ridge · mean(diag G)``. The taps are permuted channel by channel in ``order``
    (the intercept first), so each ``M_k`` is a leading block of one matrix: one
    Cholesky factorisation ``L`` and one triangular solve ``L⁻¹R`` give every ``k`` from
    the cumulative squared row norms. Cost: ``(ck)³/3 + (ck)²n`` multiply-adds, about
    2.5 s on one CPU core for ``c = 512`` channels of 3×3 taps (``ck = 4608``), less
    than accumulating the statistics themselves.

    Parameters
    ----------
    stats : PatchStats
        Sums for the consumer (:class:`recon.stats.PatchStats`).
    order : Tensor, shape (c,)
        A permutation of the consumer's input channels.
    counts : Tensor or sequence of int, optional
        Kept counts in ``[1, c]``; default every count ``1 .. c``.
    fit_bias : bool, default True
        Re-fit the intercept (the consumer's bias), as :func:`recon.solve.lstsq`.
    ridge : float >= 0, default 1e-6

    Returns
    -------
    Tensor, shape (len(counts),), float64
        Relative errors, non-increasing in ``k``, on the statistics' device.
    """
    if not isinstance(stats, PatchStats):
        raise TypeError(
            f"The 'stats' argument must be a PatchStats. Got {type(stats).__name__} instead."
        )
    c, taps = stats.channels, stats.taps
    order = _check_order(order, c)
    counts = _check_counts(counts, c)
    ridge = _check_nonneg("ridge", ridge)
    if fit_bias and stats.count < 1:
        raise ValueError("The 'stats' argument holds no samples (count 0).")
    dev = stats.G.device
    idx = kept_taps(order.to(dev), taps)  # (c*k,) taps in the order's channel order
    G = stats.G[idx][:, idx]  # (c*k, c*k)
    R = stats.C[idx]  # (c*k, n)
    d = G.shape[0]
    eps = ridge * float(G.diagonal().sum()) / d + 1e-12
    if fit_bias:
        s = stats.s[idx]
        top = torch.cat([s.new_tensor([float(stats.count)]), s])[None]
        G = torch.cat([top, torch.cat([s[:, None], G], dim=1)], dim=0)  # (1 + c*k, 1 + c*k)
        R = torch.cat([stats.t[None], R], dim=0)
    L = _prefix_cholesky(G, eps, "stats", skip=int(fit_bias))
    Z = torch.linalg.solve_triangular(L, R, upper=False)  # (rows, n)
    explained = torch.cumsum((Z * Z).sum(1), 0)
    rows = counts.to(dev) * taps - 1 + int(fit_bias)
    return _relative_curve(explained[rows], stats.yy, L)


def _prefix_cholesky(P: Tensor, eps: float, name: str, *, skip: int = 0) -> Tensor:
    """Lower Cholesky factor of ``P + εI`` (the first ``skip`` diagonal entries unridged),
    the ridge raised a hundredfold at a time until the factorisation succeeds."""
    if not torch.isfinite(P).all():
        raise ValueError(f"The {name!r} argument holds non-finite values (NaN or inf).")
    ridge = torch.full((P.shape[0],), eps, dtype=P.dtype, device=P.device)
    ridge[:skip] = 0
    for jitter in _JITTERS:
        L, info = torch.linalg.cholesky_ex(P + torch.diag(ridge * jitter))
        if int(info) == 0:
            return L
    raise ValueError(
        f"The {name!r} argument's Gram is not positive semidefinite: no Cholesky factor "
        f"with a ridge of up to {eps * _JITTERS[-1]:.3g}."
    )


def _relative_curve(explained: Tensor, yy: Tensor | float, like: Tensor) -> Tensor:
    yy = float(yy)
    if not math.isfinite(yy):
        raise ValueError(f"The 'yy' argument must be finite. Got {yy!r} instead.")
    if yy <= 0:
        return torch.zeros_like(explained, dtype=like.dtype)
    return ((yy - explained) / yy).clamp_min(0.0)


# ------------------------------------------------------------------------ global solve


@dataclass(frozen=True)
class Allocation:
    """Channels per unit chosen by :func:`allocate`, and their predicted cost.

    Attributes
    ----------
    channels : dict of str to int
        Channels kept by every unit, in unit order; ignored units keep their width.
    cost : float
        Summed cost of the chosen counts over the units not ignored.
    costs : dict of str to float
        Each unit's cost at its chosen count (units not ignored).
    flops : float
        Predicted FLOPs, :func:`recon.budget.predict_flops`.
    target_flops : float
        ``total_flops / speedup``.
    multiplier : float
        The Lagrange multiplier ``μ`` (cost per FLOP) of the cheapest relaxed solution
        within the target; 0 when the cheapest counts already meet it.
    solver : str
        ``"tree dp"`` (the units' coupling is a forest: exact dynamic programs) or
        ``"coordinate descent"`` (it is not: a local optimum).
    """

    channels: dict[str, int]
    cost: float
    costs: dict[str, float]
    flops: float
    target_flops: float
    multiplier: float
    solver: str


def allocate(
    units: Sequence[BudgetUnit],
    curves: Mapping[str, tuple[Sequence[int] | Tensor, Sequence[float] | Tensor]],
    *,
    speedup: float,
    module_flops: Mapping[str, int],
    total_flops: int,
    ignored_layers: Iterable[str] = (),
    round_to: int = 1,
    rtol: float = FLOPS_RTOL,
) -> Allocation:
    """Channels per unit that minimise the summed cost under a FLOPs target.

    Parameters
    ----------
    units : sequence of BudgetUnit
        The prunable units (:class:`recon.budget.BudgetUnit`).
    curves : mapping of str to (counts, costs)
        For every unit not ignored, the counts it may keep (increasing, in
        ``[1, width]``, each a multiple of ``round_to`` or the width; see
        :func:`count_grid`) and the cost of each (any finite numbers: output errors
        from :func:`scale_error_curve` or :func:`lstsq_error_curve` times a
        sensitivity). Curves of ignored units are not used.
    speedup : float >= 1
        Target ``total_flops / predicted FLOPs``.
    module_flops : mapping of str to int
        Per-module FLOPs of the unpruned network (:func:`recon.budget.count_flops`).
    total_flops : int
        FLOPs of the unpruned network.
    ignored_layers : iterable of str, default ()
        Units kept at full width.
    round_to : int >= 1, default 1
        Every count of ``curves`` must be a multiple of ``round_to`` or the width.
    rtol : float in (0, 1), default 0.02
        The predicted FLOPs are at most the target ``T = total_flops / speedup``, and at
        least ``(1 - rtol) T`` whenever the allowed counts can reach that band.

    Returns
    -------
    Allocation

    Notes
    -----
    With ``k_u`` unit ``u``'s count, ``c_u`` its cost curve and ``F(k)`` the predicted
    FLOPs (:func:`recon.budget.predict_flops`), the problem is

    .. math::

        \\min_k \\sum_u c_u(k_u) \\quad \\text{s.t.} \\quad
        (1 - \\text{rtol})\\, T \\le F(k) \\le T .

    and, when no counts reach the band, the least distance below it comes first and the
    cost second.

    ``F`` is the budget's model expanded in the keep ratios ``r_u = k_u / w_u``: every
    module's FLOPs scale with the product of the ratios of the units that touch it, and
    a module is touched by at most two units (its producer-side and its consumer-side
    unit), so ``F = F_0 + Σ_u f_u(k_u) + Σ_{(u,v)} f_{uv}(k_u, k_v)``. When the graph of
    the pairs is a forest (a VGG is one chain; a ResNet a chain per block, sampler ->
    conv1 unit), three solutions are found:

    - the **budget DP** (as SPDY / Optimal Brain Compression): the least cost for every
      bucket of FLOPs, by dynamic programming over each tree with state (count, FLOPs
      bucket), the trees' tables then combined by min-plus convolution. It works on
      at most ``DP_MAX_COUNTS`` counts per unit and about ``DP_WORK`` table entries
      (1,000 to 20,000 buckets), so it is exact up to the FLOPs rounding on small
      problems and a close start on large ones;
    - the **Lagrangian relaxation** ``min Σ_u c_u(k_u) + μ F(k)`` on every count, solved
      exactly for each ``μ`` by dynamic programming over each tree, state = the unit's
      count, ``O(Σ_{(u,v)} m_u m_v)`` per ``μ``; ``μ`` is bisected to the target, giving
      the cheapest relaxed solution within it and the one just over it.

    Each is improved by exchange moves, on ``(distance from the band, cost)``: a unit
    to any count, then pairs of units within ``PAIR_WINDOW`` grid steps; outside the
    band the move into it with the least cost, or towards it with the least cost per
    FLOP; inside, the move that lowers the cost most without leaving it. The best of
    the three is returned. If the pairs are not a forest (a module touched by three
    units, or a cycle), the relaxation is solved by coordinate descent, one unit at a
    time, and there is no budget DP: the result is a local optimum.

    Tested against exhaustive search on small chains, forests and trees.

    Raises
    ------
    ValueError
        If the target cannot be reached with every unit at its smallest count; the
        message gives the maximum speedup.

    Examples
    --------
    >>> units = [BudgetUnit("a", 4, ("c1",), ("c2",)), BudgetUnit("b", 4, ("c2",), ("c3",))]
    >>> flops = {"c1": 100, "c2": 400, "c3": 100}
    >>> curves = {"a": ([1, 2, 3, 4], [0.5, 0.1, 0.0, 0.0]),  # "a" is redundant
    ...           "b": ([1, 2, 3, 4], [0.9, 0.5, 0.2, 0.0])}
    >>> alloc = allocate(units, curves, speedup=2.0, module_flops=flops, total_flops=600)
    >>> alloc.channels, alloc.flops
    ({'a': 2, 'b': 3}, 275.0)
    """
    units = _budget._check_units(units)
    widths = {u.name: u.width for u in units}
    round_to = _check_int("round_to", round_to, 1)
    ignored = _budget._check_ignored(ignored_layers, widths)
    speedup, target = _check_target(speedup, module_flops, total_flops)
    if not _budget._is_real(rtol) or not 0 < rtol < 1:
        raise ValueError(f"The 'rtol' argument must be a float in (0, 1). Got {rtol!r} instead.")
    free = [u.name for u in units if u.name not in ignored]
    grid, cost = _check_curves(curves, free, widths, round_to)

    channels = dict(widths)
    if not free:
        flops = _budget.predict_flops(units, channels, module_flops, total_flops)
        return Allocation(channels, 0.0, {}, flops, target, 0.0, "tree dp")
    ratios = [g / widths[n] for n, g in zip(free, grid, strict=True)]
    model = _FlopsModel(units, free, ratios, module_flops, total_flops)
    smallest = np.zeros(len(free), dtype=np.int64)
    if model.total(smallest) > target * (1 + 1e-12):
        least = {n: int(g[0]) for n, g in zip(free, grid, strict=True)}
        least_flops = _budget.predict_flops(units, {**channels, **least}, module_flops, total_flops)
        best = total_flops / least_flops
        raise ValueError(
            "The 'speedup' argument must be at most the maximum achievable speedup, "
            f"{best:.4g} (every unit not ignored at the smallest count of its curve; "
            f"{len(ignored)} unit(s) ignored). Got {speedup!r} instead."
        )
    solver = _Solver(model, cost, target, rtol)
    x, mu = solver.solve()
    for name, g, i in zip(free, grid, x, strict=True):
        channels[name] = int(g[i])
    costs = {n: float(c[i]) for n, c, i in zip(free, cost, x, strict=True)}
    flops = _budget.predict_flops(units, channels, module_flops, total_flops)
    solver_name = "tree dp" if model.forest else "coordinate descent"
    return Allocation(channels, float(sum(costs.values())), costs, flops, target, mu, solver_name)


def cost_at(
    curves: Mapping[str, tuple[Sequence[int] | Tensor, Sequence[float] | Tensor]],
    channels: Mapping[str, int],
) -> dict[str, float]:
    """The cost of each listed unit's count, read off its curve.

    Counts between two of the curve's counts are interpolated linearly (outside the
    curve, its end values): for reporting what another choice, e.g. a uniform keep
    ratio from :func:`recon.budget.resolve_channels`, is predicted to cost.

    Parameters
    ----------
    curves : mapping of str to (counts, costs)
        As for :func:`allocate`.
    channels : mapping of str to int
        Counts of the units to read; units without a curve are skipped.

    Returns
    -------
    dict of str to float

    Examples
    --------
    >>> cost_at({"a": ([2, 4], [1.0, 0.0])}, {"a": 3, "b": 8})
    {'a': 0.5}
    """
    if not isinstance(curves, Mapping) or not isinstance(channels, Mapping):
        raise TypeError(
            "The 'curves' and 'channels' arguments must be dicts keyed by unit name. "
            f"Got {type(curves).__name__} and {type(channels).__name__}."
        )
    out = {}
    for name, count in channels.items():
        if name in curves:
            counts, costs = (
                np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=np.float64)
                for v in curves[name]
            )
            out[name] = float(np.interp(count, counts, costs))
    return out


class _FlopsModel:
    """:func:`recon.budget.predict_flops` as a polynomial of the free units' grid indices.

    ``F(x) = F_0 + Σ_terms F_m Π_{(u, e)} r_u[x_u]^e``: one term per module touched by a
    free unit, ``e`` the number of the unit's module lists (out, in) naming it, as in
    the budget's ``_module_scales``; ignored units keep ratio 1. A module read in part
    by several units (``in_shares``, a concatenation) is one term per unit's share and
    one for the rest.
    """

    def __init__(self, units, free, ratios, module_flops, total_flops) -> None:
        index = {name: i for i, name in enumerate(free)}
        touch: dict[str, dict[int, int]] = {}
        parts: dict[str, dict[int, float]] = {}  # modules read in part: unit -> share
        for unit in units:
            i = index.get(unit.name)
            for m in set(unit.out_modules):
                powers = touch.setdefault(m, {})
                if i is not None:
                    powers[i] = powers.get(i, 0) + 1
            for m, share in unit.shares().items():
                powers = touch.setdefault(m, {})
                if share < 1.0:  # F_m (1 - Σ s_u + Σ s_u r_u): one term per share
                    shares = parts.setdefault(m, {})
                    if i is not None:
                        shares[i] = shares.get(i, 0.0) + share
                elif i is not None:
                    powers[i] = powers.get(i, 0) + 1
        self.ratios = ratios  # per free unit, (m_u,) float64
        self.const = float(total_flops)
        self.terms: list[tuple[float, tuple[tuple[int, int], ...]]] = []
        for m, powers in touch.items():
            f = float(module_flops.get(m, 0))
            shares = parts.get(m, {})
            if not f or not (powers or shares):
                continue
            self.const -= f
            rest = f * (1.0 - sum(shares.values()))
            if powers:
                self.terms.append((rest, tuple(sorted(powers.items()))))
            else:
                self.const += rest
            for u, share in shares.items():
                self.terms.append((f * share, tuple(sorted({**powers, u: 1}.items()))))
        self.of_unit: list[list[int]] = [[] for _ in free]
        for t, (_, powers) in enumerate(self.terms):
            for u, _ in powers:
                self.of_unit[u].append(t)
        self.forest = self._build_forest(len(free))

    def total(self, x: np.ndarray) -> float:
        """``F(x)``."""
        return self.const + sum(self._rest(t, x, ()) for t in range(len(self.terms)))

    def _rest(self, t: int, x: np.ndarray, skip: tuple[int, ...]) -> float:
        """Term ``t`` at ``x`` without the factors of the units in ``skip``."""
        f, powers = self.terms[t]
        return f * math.prod(float(self.ratios[u][x[u]]) ** e for u, e in powers if u not in skip)

    def single(self, u: int, x: np.ndarray) -> np.ndarray:
        """``F(x with x_u = i) - F(x)`` for every index ``i`` of unit ``u``."""
        delta = np.zeros(len(self.ratios[u]))
        for t in self.of_unit[u]:
            e = dict(self.terms[t][1])[u]
            r = self.ratios[u] ** e
            delta += self._rest(t, x, (u,)) * (r - r[x[u]])
        return delta

    def pair(self, u: int, v: int, x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``F(x with x_u = i, x_v = j) - F(x)`` for ``i`` in ``rows``, ``j`` in ``cols``."""
        du = np.zeros(len(rows))
        dv = np.zeros(len(cols))
        joint = np.zeros((len(rows), len(cols)))
        shared = set(self.of_unit[u]) & set(self.of_unit[v])
        for t in self.of_unit[u]:
            if t not in shared:
                e = dict(self.terms[t][1])[u]
                du += self._rest(t, x, (u,)) * (
                    self.ratios[u][rows] ** e - self.ratios[u][x[u]] ** e
                )
        for t in self.of_unit[v]:
            if t not in shared:
                e = dict(self.terms[t][1])[v]
                dv += self._rest(t, x, (v,)) * (
                    self.ratios[v][cols] ** e - self.ratios[v][x[v]] ** e
                )
        for t in shared:
            powers = dict(self.terms[t][1])
            a, b = powers[u], powers[v]
            now = self.ratios[u][x[u]] ** a * self.ratios[v][x[v]] ** b
            new = np.outer(self.ratios[u][rows] ** a, self.ratios[v][cols] ** b)
            joint += self._rest(t, x, (u, v)) * (new - now)
        return du[:, None] + dv[None, :] + joint

    def _build_forest(self, n: int) -> bool:
        """Unary and pair FLOPs for the tree DP; False if the pairs do not form a forest."""
        self.unary = [np.zeros(len(r)) for r in self.ratios]
        self.pairs: dict[tuple[int, int], np.ndarray] = {}
        for f, powers in self.terms:
            if len(powers) > 2:
                return False
            if len(powers) == 1:
                ((u, e),) = powers
                self.unary[u] += f * self.ratios[u] ** e
            else:
                (u, a), (v, b) = powers
                table = f * np.outer(self.ratios[u] ** a, self.ratios[v] ** b)
                self.pairs[(u, v)] = self.pairs.get((u, v), 0) + table
        neighbours: list[list[int]] = [[] for _ in range(n)]
        for u, v in self.pairs:
            neighbours[u].append(v)
            neighbours[v].append(u)
        # Breadth-first from the lowest index of each component: a forest has no edge
        # back to a visited unit other than the parent.
        self.parent = np.full(n, -1)
        self.bfs: list[int] = []
        seen = np.zeros(n, dtype=bool)
        for root in range(n):
            if seen[root]:
                continue
            seen[root] = True
            queue = [root]
            while queue:
                u = queue.pop(0)
                self.bfs.append(u)
                for v in neighbours[u]:
                    if v == self.parent[u]:
                        continue
                    if seen[v]:
                        return False
                    seen[v] = True
                    self.parent[v] = u
                    queue.append(v)
        return True

    def edge(self, v: int) -> np.ndarray:
        """Pair FLOPs of unit ``v`` and its parent, shape (m_v, m_parent)."""
        p = int(self.parent[v])
        return self.pairs[(v, p)] if (v, p) in self.pairs else self.pairs[(p, v)].T


class _Solver:
    """Lagrangian relaxation, then exchange moves; see :func:`allocate`'s Notes."""

    def __init__(self, model: _FlopsModel, cost: list[np.ndarray], target: float, rtol: float):
        self.model = model
        self.cost = cost
        self.upper = target * (1 + 1e-12)  # round-off of the FLOPs sums
        self.lower = (1 - rtol) * target
        scale = max(float(np.abs(c).max()) for c in cost)
        self.tol = 1e-12 * max(scale, 1e-300)

    def solve(self) -> tuple[np.ndarray, float]:
        """Local search from the budget DP's solution and the relaxed solutions either
        side of the target; the best result."""
        starts, mu = self._relaxed()
        if self.model.forest:
            starts.append(self._budget_dp())
        finals = [self._local_search(x) for x in starts]
        return min(finals, key=lambda x: (self._violation(self.model.total(x)), self._cost(x))), mu

    def _cost(self, x: np.ndarray) -> float:
        return float(sum(c[i] for c, i in zip(self.cost, x, strict=True)))

    def _violation(self, flops):
        """Distance of the FLOPs from the band ``[lower, upper]``; above the target is
        worse than any distance below it."""
        return np.where(flops > self.upper, self.upper + flops, np.maximum(self.lower - flops, 0))

    # relaxed problem: min Σ c_u + μ F

    def _relax(self, mu: float, start: np.ndarray) -> np.ndarray:
        if self.model.forest:
            return self._tree_dp(mu)
        return self._coordinate_descent(mu, start)

    def _tree_dp(self, mu: float) -> np.ndarray:
        m = self.model
        total = [c + mu * f for c, f in zip(self.cost, m.unary, strict=True)]
        choice: list[np.ndarray | None] = [None] * len(total)
        for v in reversed(m.bfs):  # children before their parents
            p = int(m.parent[v])
            if p >= 0:
                table = total[v][:, None] + mu * m.edge(v)  # (m_v, m_p)
                best = table.argmin(0)
                choice[v] = best
                total[p] = total[p] + table[best, np.arange(table.shape[1])]
        x = np.zeros(len(total), dtype=np.int64)
        for v in m.bfs:  # parents before their children
            p = int(m.parent[v])
            x[v] = int(total[v].argmin()) if p < 0 else int(choice[v][x[p]])
        return x

    def _coordinate_descent(self, mu: float, start: np.ndarray) -> np.ndarray:
        x = start.copy()
        for _ in range(_MAX_SWEEPS):
            changed = False
            for u in range(len(x)):
                value = self.cost[u] + mu * self.model.single(u, x)
                i = int(value.argmin())
                if value[i] < value[x[u]] - self.tol:
                    x[u], changed = i, True
            if not changed:
                break
        return x

    def _relaxed(self) -> tuple[list[np.ndarray], float]:
        """Bisection on ``μ``: the cheapest relaxed solution within the target, and the
        relaxed solution of the largest ``μ`` found over it, with that ``μ``."""
        m = self.model
        top = np.array([len(c) - 1 for c in self.cost])
        x0 = self._relax(0.0, top)
        if m.total(x0) <= self.upper:
            return [x0], 0.0
        spread = sum(float(c.max() - c.min()) for c in self.cost)
        reach = m.total(top) - m.total(np.zeros_like(top))
        lo, x_lo = 0.0, x0
        hi = (spread if spread > 0 else 1.0) / max(reach, 1e-300)
        x_hi = self._relax(hi, x0)
        while m.total(x_hi) > self.upper:
            lo, x_lo = hi, x_hi
            hi *= 4
            # the smallest counts meet the target (checked by the caller)
            x_hi = self._relax(hi, x_hi) if hi < 1e300 else np.zeros_like(top)
        found = [(self._cost(x_hi), hi, x_hi)]
        lo = max(lo, hi / 4)
        for _ in range(_BISECTION_STEPS):
            if hi <= lo * (1 + 1e-9):
                break
            mid = math.sqrt(lo * hi)
            x_mid = self._relax(mid, x_hi)
            if m.total(x_mid) <= self.upper:
                hi, x_hi = mid, x_mid
                found.append((self._cost(x_mid), mid, x_mid))
            else:
                lo, x_lo = mid, x_mid
        _, mu, x = min(found, key=lambda item: (item[0], item[1]))
        return [x, x_lo], mu

    # budget DP: min Σ c_u per bucket of FLOPs

    def _budget_dp(self) -> np.ndarray:
        """Tree DP over (count, FLOPs bucket) on a sub-grid of at most ``DP_MAX_COUNTS``
        counts per unit: the cheapest counts in the band, up to the FLOPs rounding."""
        m = self.model
        n = len(self.cost)
        sel = [_spread(len(c), DP_MAX_COUNTS) for c in self.cost]
        cost = [c[s] for c, s in zip(self.cost, sel, strict=True)]
        pairs = sum(len(sel[v]) * len(sel[int(m.parent[v])]) for v in m.bfs if m.parent[v] >= 0)
        nb = int(np.clip(DP_WORK // max(pairs + sum(map(len, sel)), 1), *DP_BUCKETS))
        room = self.upper - m.const  # FLOPs the units may use
        step = room / nb if room > 0 else 1.0
        unary = [np.rint(m.unary[u][sel[u]] / step).astype(np.int64) for u in range(n)]
        edge = {
            v: np.rint(m.edge(v)[sel[v]][:, sel[int(m.parent[v])]] / step).astype(np.int64)
            for v in m.bfs
            if m.parent[v] >= 0
        }
        size = nb + 1
        children: list[list[int]] = [[] for _ in range(n)]
        for v in m.bfs:
            if m.parent[v] >= 0:
                children[int(m.parent[v])].append(v)

        msg: dict[int, np.ndarray] = {}  # child -> (m_parent, size) cheapest cost per bucket
        arg: dict[int, np.ndarray] = {}  # child -> (m_parent, size) the child's count
        split: dict[int, list] = {}  # unit -> per count, per extra child, bucket split
        base: dict[int, np.ndarray] = {}  # root -> (m_root, size)
        for v in reversed(m.bfs):
            acc = np.full((len(sel[v]), size), np.inf)
            acc[:, 0] = 0.0
            split[v] = []
            for i, c in enumerate(children[v]):
                if i == 0:
                    acc = msg[c]
                    continue
                pieces = [_min_plus(acc[k], msg[c][k]) for k in range(len(sel[v]))]
                acc = np.stack([p[0] for p in pieces])
                split[v].append(np.stack([p[1] for p in pieces]))
            table = _shift(acc, unary[v]) + cost[v][:, None]  # (m_v, size)
            p = int(m.parent[v])
            if p < 0:
                base[v] = table
                continue
            shifted = np.stack([_shift(table, edge[v][:, j]) for j in range(len(sel[p]))])
            arg[v] = shifted.argmin(1)  # (m_p, size)
            msg[v] = np.take_along_axis(shifted, arg[v][:, None], 1)[:, 0]

        roots = [v for v in m.bfs if m.parent[v] < 0]
        total, tree_splits = None, []
        for r in roots:
            best = base[r].min(0)
            if total is None:
                total = best
            else:
                total, where = _min_plus(total, best)
                tree_splits.append(where)
        if not np.isfinite(total).any():  # nothing within the target after rounding
            return np.zeros(n, dtype=np.int64)
        # The cheapest buckets in the band (the FLOPs are rounded: several, each checked
        # with the exact FLOPs), or the highest bucket if the band is out of reach.
        low = max(math.ceil((self.lower - m.const) / step), 0)
        finite = np.flatnonzero(np.isfinite(total))
        in_band = finite[finite >= low]
        if in_band.size:
            picks = in_band[np.argsort(total[in_band], kind="stable")[:DP_CANDIDATES]]
        else:
            picks = finite[-DP_CANDIDATES:]
        found = []
        for bucket in picks.tolist():
            buckets = {}
            for r, where in zip(reversed(roots[1:]), reversed(tree_splits), strict=True):
                first = int(where[bucket])
                buckets[r], bucket = bucket - first, first
            buckets[roots[0]] = bucket
            x = np.zeros(n, dtype=np.int64)
            stack = [(r, int(base[r][:, buckets[r]].argmin()), buckets[r]) for r in roots]
            while stack:
                v, k, b = stack.pop()
                x[v] = sel[v][k]
                b -= unary[v][k]
                kids = children[v]
                parts = [b] if kids else []
                for i in range(len(kids) - 1, 0, -1):
                    first = int(split[v][i - 1][k, parts[0]])
                    parts = [first, parts[0] - first, *parts[1:]]
                for c, bc in zip(kids, parts, strict=True):
                    kc = int(arg[c][k, bc])
                    stack.append((c, kc, bc - edge[c][kc, k]))
            found.append(x)
        return min(found, key=lambda x: (self._violation(m.total(x)), self._cost(x)))

    # exchange moves

    def _moves(self, x: np.ndarray):
        """Single moves, a unit to any count: (new FLOPs, cost change, units, None)."""
        m = self.model
        now = m.total(x)
        for u in range(len(x)):
            yield now + m.single(u, x), self.cost[u] - self.cost[u][x[u]], (u,), None

    def _pair_moves(self, x: np.ndarray):
        """Pair moves, two units within ``PAIR_WINDOW`` steps each: (new FLOPs, cost
        change, units, their count indices), as matrices."""
        m = self.model
        now = m.total(x)
        windows = [
            np.arange(max(0, i - PAIR_WINDOW), min(len(c), i + PAIR_WINDOW + 1))
            for c, i in zip(self.cost, x, strict=True)
        ]
        for u in range(len(x)):
            for v in range(u + 1, len(x)):
                rows, cols = windows[u], windows[v]
                gain = (self.cost[u][rows] - self.cost[u][x[u]])[:, None] + (
                    self.cost[v][cols] - self.cost[v][x[v]]
                )[None, :]
                yield now + m.pair(u, v, x, rows, cols), gain, (u, v), (rows, cols)

    @staticmethod
    def _apply(x: np.ndarray, units: tuple[int, ...], grids, flat: int, shape) -> None:
        if grids is None:
            x[units[0]] = flat
            return
        i, j = np.unravel_index(flat, shape)
        x[units[0]], x[units[1]] = grids[0][i], grids[1][j]

    def _local_search(self, x: np.ndarray) -> np.ndarray:
        """Exchange moves on ``(distance from the band, cost)``.

        Outside the band, the move into it with the least cost, or else the move
        towards it with the least cost per FLOP of distance removed; inside (or when
        the band is out of reach), the move that lowers the cost most without leaving
        the band or moving away from it. Single moves first, pairs when no single
        move helps.
        """
        x = x.copy()
        for _ in range(_MAX_MOVES):
            now = self.model.total(x)
            off = float(self._violation(now))
            for moves in (self._moves, self._pair_moves):
                best = None  # (key, units, grids, flat index, shape)
                for flops, gain, units, grids in moves(x):
                    dist = self._violation(flops)
                    if off > 0:
                        into = dist <= 0
                        closer = dist < off
                        key = np.where(
                            into,
                            gain,
                            np.where(closer, gain / np.maximum(off - dist, 1e-300), np.inf),
                        )
                        rank = np.where(into, 0, 1)
                        # moves into the band first (by cost), then towards it (by cost per FLOP)
                        score = np.where(closer, rank, 2)
                        flat = int(np.lexsort((key.ravel(), score.ravel()))[0])
                        candidate = (int(score.ravel()[flat]), float(key.ravel()[flat]))
                        if candidate[0] == 2:
                            candidate = None
                    else:
                        candidate = None
                    if candidate is None:  # lower the cost without moving away from the band
                        ok = dist <= off
                        key = np.where(ok, gain, np.inf)
                        flat = int(key.argmin())
                        if not key.ravel()[flat] < -self.tol:
                            continue
                        candidate = (3, float(key.ravel()[flat]))
                    if best is None or candidate < best[0]:
                        best = (candidate, units, grids, flat, gain.shape)
                if best is not None:
                    break
            if best is None:
                return x
            self._apply(x, *best[1:])
        return x


def _spread(m: int, most: int) -> np.ndarray:
    """At most ``most`` indices of ``0 .. m-1``, evenly spread, the first and last kept."""
    if m <= most:
        return np.arange(m)
    return np.unique(np.rint(np.linspace(0, m - 1, most)).astype(np.int64))


def _shift(table: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Row ``i`` of ``table`` (rows, size) moved ``by[i] >= 0`` buckets up; inf below, cut above."""
    size = table.shape[1]
    out = np.full(table.shape, np.inf)
    for i, s in enumerate(by.tolist()):
        if s < size:
            out[i, s:] = table[i, : size - s]
    return out


def _min_plus(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``out[j] = min_i a[i] + b[j - i]`` for ``j < len(a)``, and the minimising ``i``."""
    size = len(a)
    out = np.full(size, np.inf)
    where = np.zeros(size, dtype=np.int64)
    for i in np.flatnonzero(np.isfinite(a)):
        cand = a[i] + b[: size - i]
        better = cand < out[i:]
        out[i:][better] = cand[better]
        where[i:][better] = i
    return out, where


# ------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"The {name!r} argument must be an int >= {low}. "
            f"Got {value!r} of type {type(value).__name__} instead."
        )
    if value < low:
        raise ValueError(f"The {name!r} argument must be an int >= {low}. Got {value!r} instead.")
    return int(value)


def _check_nonneg(name: str, value: object) -> float:
    if not _budget._is_real(value) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"The {name!r} argument must be a finite float >= 0. Got {value!r}.")
    return float(value)


def _check_square(name: str, A: object) -> int:
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(
            f"The {name!r} argument must be a square (c, c) Tensor with c >= 1. "
            f"Got {getattr(A, 'shape', type(A).__name__)} instead."
        )
    return A.shape[0]


def _check_vector(name: str, v: object, c: int) -> Tensor:
    if not isinstance(v, Tensor) or tuple(v.shape) != (c,):
        raise ValueError(
            f"The {name!r} argument must be a Tensor of shape ({c},). "
            f"Got {getattr(v, 'shape', type(v).__name__)} instead."
        )
    return v


def _check_order(order: object, c: int) -> Tensor:
    if not isinstance(order, Tensor) or order.dtype.is_floating_point or order.shape != (c,):
        raise ValueError(
            f"The 'order' argument must be an integer Tensor of shape ({c},), a permutation "
            f"of the channels. Got {getattr(order, 'shape', type(order).__name__)} instead."
        )
    order = order.detach().cpu().long()
    if not torch.equal(order.sort().values, torch.arange(c)):
        raise ValueError(
            f"The 'order' argument must be a permutation of 0 .. {c - 1}. Got {order.tolist()}."
        )
    return order


def _check_counts(counts: object, c: int) -> Tensor:
    if counts is None:
        return torch.arange(1, c + 1)
    values = np.asarray(counts.detach().cpu() if isinstance(counts, Tensor) else counts)
    if values.ndim != 1 or values.dtype.kind not in "iu" or values.size == 0:
        raise ValueError(
            f"The 'counts' argument must be a non-empty 1-D sequence of ints in [1, {c}]. "
            f"Got {counts!r} instead."
        )
    if values.min() < 1 or values.max() > c:
        raise ValueError(
            f"The 'counts' argument must hold ints in [1, {c}]. Got {values.tolist()} instead."
        )
    return torch.as_tensor(values, dtype=torch.int64)


def _check_target(
    speedup: object, module_flops: object, total_flops: object
) -> tuple[float, float]:
    if not _budget._is_real(speedup):
        raise TypeError(
            "The 'speedup' argument must be a float >= 1. "
            f"Got {speedup!r} of type {type(speedup).__name__} instead."
        )
    if not speedup >= 1 or not math.isfinite(speedup):
        raise ValueError(
            f"The 'speedup' argument must be a finite float >= 1. Got {speedup!r} instead."
        )
    if not isinstance(module_flops, Mapping):
        raise TypeError(
            "The 'module_flops' argument must be a dict of module name to FLOPs. "
            f"Got {type(module_flops).__name__} instead."
        )
    if not _budget._is_real(total_flops) or not total_flops > 0:
        raise ValueError(
            f"The 'total_flops' argument must be a number > 0. Got {total_flops!r} instead."
        )
    return float(speedup), float(total_flops) / float(speedup)


def _check_curves(
    curves: object, free: list[str], widths: Mapping[str, int], round_to: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not isinstance(curves, Mapping):
        raise TypeError(
            "The 'curves' argument must be a dict of unit name to (counts, costs). "
            f"Got {type(curves).__name__} instead."
        )
    _budget._check_known("curves", curves, widths)
    missing = [n for n in free if n not in curves]
    if missing:
        raise ValueError(
            f"The 'curves' argument has no curve for units {_budget._names_hint(missing)}; "
            "every unit not in 'ignored_layers' needs one."
        )
    grids, costs = [], []
    for name in free:
        label = f"'curves[{name!r}]'"
        pair = curves[name]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise TypeError(
                f"The {label} argument must be a pair (counts, costs). "
                f"Got {type(pair).__name__} instead."
            )
        counts, cost = (np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v) for v in pair)
        width = widths[name]
        if counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iu":
            raise ValueError(
                f"The {label} argument's counts must be a non-empty 1-D sequence of ints. "
                f"Got {pair[0]!r} instead."
            )
        if (np.diff(counts) <= 0).any() or counts[0] < 1 or counts[-1] > width:
            raise ValueError(
                f"The {label} argument's counts must increase within [1, {width}]. "
                f"Got {counts.tolist()} instead."
            )
        off = counts[(counts % round_to != 0) & (counts != width)]
        if off.size:
            raise ValueError(
                f"The {label} argument's counts must be multiples of round_to={round_to} or "
                f"the width {width}. Got {off.tolist()}."
            )
        if cost.shape != counts.shape or cost.dtype.kind not in "iuf":
            raise ValueError(
                f"The {label} argument's costs must be {counts.size} numbers, one per count. "
                f"Got {pair[1]!r} instead."
            )
        if not np.isfinite(cost).all():
            raise ValueError(f"The {label} argument's costs must be finite. Got {cost.tolist()}.")
        grids.append(counts.astype(np.float64))
        costs.append(cost.astype(np.float64))
    return grids, costs
