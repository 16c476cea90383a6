"""Re-fitting a consumer from its kept input channels, and error formulas.

All functions work from the sufficient statistics (:mod:`recon.stats`) alone: no
samples, no extra pass over the data. This module sees tensors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .stats import PatchStats

__all__ = [
    "CENTERS",
    "CV_OUTPUTS",
    "CV_WIDE",
    "LSTSQ_MODES",
    "RECONSTRUCT",
    "RIDGE_GRID",
    "RIDGE_GRID_WIDE",
    "CVFit",
    "channel_error",
    "cv_lstsq",
    "kept_taps",
    "lstsq",
    "patch_error",
    "scale",
]

RECONSTRUCT = ("lstsq", "lstsq_plain", "scale", "none")
#: The modes that re-fit by least squares on the patch statistics.
LSTSQ_MODES = ("lstsq", "lstsq_plain")


def kept_taps(keep: Tensor, taps: int) -> Tensor:
    """Patch indices owned by the kept channels: channel ``i`` owns ``i*k .. i*k+k-1``."""
    return (keep[:, None] * taps + torch.arange(taps, device=keep.device)).flatten()


def _solve_spd(M: Tensor, R: Tensor) -> Tensor:
    """Solve ``M X = R`` for symmetric positive (semi)definite ``M``.

    Cholesky when ``M`` is numerically positive definite, otherwise a minimum-norm
    least-squares solution (SVD-based ``gelsd`` on CPU).
    """
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        X = torch.cholesky_solve(R, L)
        if torch.isfinite(X).all():
            return X
    if M.device.type == "cpu":
        return torch.linalg.lstsq(M, R, driver="gelsd").solution
    return torch.linalg.pinv(M, hermitian=True) @ R


def lstsq(
    stats: PatchStats,
    keep: Tensor,
    *,
    fit_bias: bool = True,
    ridge: float = 1e-6,
) -> tuple[Tensor, Tensor | None]:
    """Least-squares weights of a consumer that reads only the kept channels.

    Solves

    .. math:: \\min_{W', \\beta} \\sum \\|y - W' x_S - \\beta\\|^2
              + \\varepsilon \\|W'\\|_F^2, \\qquad
              \\varepsilon = \\text{ridge} \\cdot \\operatorname{tr}(G_{SS}) / |S|,

    through the normal equations of the statistics, with the intercept ``β`` (the
    change of the consumer's bias) when ``fit_bias`` is true.

    Parameters
    ----------
    stats : PatchStats
        Sums for the consumer, with ``x`` from the partly pruned network and ``y`` the
        original network's output (bias removed).
    keep : Tensor, shape (m,)
        Kept input channels.

    Returns
    -------
    weight : Tensor, shape (n, m*k), float64
    bias_delta : Tensor, shape (n,), float64, or None
        To be added to the consumer's bias.
    """
    idx = kept_taps(keep.to(stats.G.device), stats.taps)
    G = stats.G[idx][:, idx]  # (m*k, m*k)
    C = stats.C[idx]  # (m*k, n)
    m = G.shape[0]
    eps = ridge * float(G.diagonal().sum()) / max(m, 1) + 1e-12
    G = G + eps * torch.eye(m, dtype=G.dtype, device=G.device)
    if fit_bias:
        s = stats.s[idx]
        top = torch.cat([G, s[:, None]], dim=1)
        bottom = torch.cat([s, s.new_tensor([float(stats.count)])])[None]
        M = torch.cat([top, bottom], dim=0)  # (m*k+1, m*k+1)
        R = torch.cat([C, stats.t[None]], dim=0)  # (m*k+1, n)
        X = _solve_spd(M, R)
        return X[:m].T.contiguous(), X[m].contiguous()
    return _solve_spd(G, C).T.contiguous(), None


def patch_error(
    stats: PatchStats, keep: Tensor, weight: Tensor, bias_delta: Tensor | None = None
) -> float:
    """Relative error ``Σ‖y − W x_S − β‖² / Σ‖y‖²`` from the statistics.

    ``weight`` has shape (n, m*k) (or (n, m, kh, kw)); ``bias_delta`` (n,) or None.
    """
    idx = kept_taps(keep.to(stats.G.device), stats.taps)
    n = weight.shape[0]
    w = weight.reshape(n, -1).to(stats.G.device, torch.float64)
    G = stats.G[idx][:, idx]
    C = stats.C[idx]
    err = stats.yy - 2 * (w.T * C).sum() + ((w @ G) * w).sum()
    if bias_delta is not None:
        beta = bias_delta.to(w)
        err = err + 2 * beta @ (w @ stats.s[idx]) - 2 * beta @ stats.t
        err = err + stats.count * beta @ beta
    return _relative(err, stats.yy)


def channel_error(
    A: Tensor, b: Tensor, yy: Tensor | float, keep: Tensor, scales: Tensor | None = None
) -> float:
    """Relative error ``‖Y − Σ_{i∈S} s_i Z_i‖² / ‖Y‖²`` from the channel problem.

    ``scales`` defaults to ones (the kept channels with their original weights).
    """
    A_SS = A[keep][:, keep]
    b_S = b[keep]
    s = torch.ones_like(b_S) if scales is None else scales.to(b_S)
    err = yy - 2 * s @ b_S + s @ A_SS @ s
    return _relative(err, yy)


def scale(A: Tensor, b: Tensor, keep: Tensor, *, ridge: float = 1e-6) -> Tensor:
    """ThiNet's per-channel scaling of the kept channels.

    .. math:: \\min_s \\|Y - \\sum_{i\\in S} s_i Z_i\\|^2 \\iff
              (A_{SS} + \\varepsilon I)\\, s = b_S.

    Returns
    -------
    Tensor, shape (m,), float64
        Multiply consumer input channel ``keep[j]``'s weights by ``s[j]``.
    """
    A_SS = A[keep][:, keep].double()
    m = A_SS.shape[0]
    eps = ridge * float(A_SS.diagonal().sum()) / max(m, 1) + 1e-12
    A_SS = A_SS + eps * torch.eye(m, dtype=A_SS.dtype, device=A_SS.device)
    return _solve_spd(A_SS, b[keep].double()[:, None])[:, 0]


def _relative(err: Tensor | float, yy: Tensor | float) -> float:
    err, yy = float(err), float(yy)
    if yy <= 0:
        return 0.0 if abs(err) <= 1e-12 else float("inf")
    return max(err, 0.0) / yy


# --------------------------------------------------------------------------- cross-validated


#: Ridge strengths tried by :func:`cv_lstsq`, in units of the mean diagonal of the
#: (centred) kept-patch Gram; ``inf`` is the safe fit itself.
RIDGE_GRID = (0.0, 0.03, 0.3, 1.0, 3.0, 10.0, 30.0, math.inf)
#: The grid for wide layers (more than :data:`CV_WIDE` kept taps), where each
#: Cholesky factorisation is costly: decades only.
RIDGE_GRID_WIDE = (0.0, 0.1, 1.0, 10.0, math.inf)
CV_WIDE = 1024
#: Centres of the ridge: ThiNet's per-channel scale fit, the original weights sliced.
CENTERS = ("scale", "original")
#: The ridge strength is chosen on at most this many of the consumer's outputs.
CV_OUTPUTS = 16


@dataclass
class CVFit:
    """What :func:`cv_lstsq` chose, and the re-fit on all the data.

    Attributes
    ----------
    weight : Tensor, shape (n, m*k), float64
    bias_delta : Tensor, shape (n,), float64
    ridge : float
        The chosen ``λ`` in units of the mean diagonal of the centred kept-patch Gram
        (0 is plain least squares, ``inf`` the safe fit itself).
    center : str
        The ridge's centre, one of :data:`CENTERS`.
    heldout_error : float
        Cross-validated relative error ``Σ_f ‖Y_f − X_f W_{−f}ᵀ − β_{−f}‖² / Σ‖Y‖²`` of
        the chosen ``(centre, λ)``, over the outputs it was chosen on; NaN with fewer
        than two non-empty folds.
    heldout : dict of (str, float) to float
        The same error for every centre and ``λ`` tried.
    """

    weight: Tensor
    bias_delta: Tensor
    ridge: float
    center: str
    heldout_error: float
    heldout: dict[tuple[str, float], float] = field(default_factory=dict)


class _Sums(NamedTuple):
    """Kept-tap blocks of patch statistics: ``G`` (m, m), ``C`` (m, n), ``s`` (m,),
    ``t`` (n,), ``yy`` (n,) per output, ``N`` samples."""

    G: Tensor
    C: Tensor
    s: Tensor
    t: Tensor
    yy: Tensor
    N: float


def _scale_centre(sums: _Sums, w_S: Tensor, wtw: Tensor, taps: int) -> Tensor:
    """ThiNet's per-channel scale fit of the kept channels' weights ``w_S`` (n, m*k).

    ``wtw`` is ``w_Sᵀ w_S`` (the same for every fold: computed once by the caller).
    """
    k, n = taps, w_S.shape[0]
    m = w_S.shape[1] // k
    A = (sums.G * wtw).reshape(m, k, m, k).sum(dim=(1, 3))
    b = (sums.C * w_S.T).reshape(m, k, n).sum(dim=(1, 2))
    eps = 1e-6 * float(A.diagonal().sum()) / max(m, 1) + 1e-12
    s = _solve_spd(A + eps * torch.eye(m, dtype=A.dtype, device=A.device), b[:, None])[:, 0]
    return w_S * s.repeat_interleave(k)[None]


def _ridge_fits(sums: _Sums, centres: Tensor, grid: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """``min ‖Y − X_S Wᵀ − β‖² + λ‖W − W_c‖²`` for every centre and ``λ`` of ``grid``.

    The intercept ``β`` is not penalised: with ``N`` samples, centred sums
    ``Ḡ = G − s sᵀ/N`` and ``C̄ = C − s tᵀ/N``, ``(Ḡ + λI) Wᵀ = C̄ + λ W_cᵀ`` and
    ``β = (t − W s)/N``. ``λ`` is in units of ``Ḡ``'s mean diagonal (plus the tiny
    stabilising ridge of :func:`lstsq`); ``inf`` gives ``W = W_c``. One Cholesky
    factorisation per finite ``λ`` (batched) serves every centre.

    Parameters
    ----------
    sums : _Sums
        The fit's data, ``C`` and ``t`` for the outputs being fitted.
    centres : Tensor, shape (P, n, m)
    grid : tuple of float, length L

    Returns
    -------
    W : Tensor, shape (L, P, n, m)
    beta : Tensor, shape (L, P, n)
    """
    G, C, s, t, N = sums.G, sums.C, sums.s, sums.t, max(sums.N, 1.0)
    Gc = G - torch.outer(s, s) / N
    Cc = C - torch.outer(s, t) / N
    m, n = C.shape
    P = centres.shape[0]
    unit = float(Gc.diagonal().sum()) / max(m, 1)
    eps = 1e-6 * float(G.diagonal().sum()) / max(m, 1) + 1e-12  # as lstsq()
    W = torch.empty(len(grid), P, n, m, dtype=G.dtype, device=G.device)
    finite = [i for i, lam in enumerate(grid) if not math.isinf(lam)]
    for i, lam in enumerate(grid):
        if math.isinf(lam):
            W[i] = centres
    if finite:
        lam_abs = torch.tensor(
            [grid[i] * unit + eps for i in finite], dtype=G.dtype, device=G.device
        )
        rhs = torch.cat([Cc, *centres.transpose(1, 2)], dim=1)  # (m, n * (1 + P))
        rank = int(N) + 8  # Ḡ is a sum of N centred outer products: rank < N
        if rank * RANGE_FACTOR <= m and bool((lam_abs > 0).all()):
            X = _shifted_solves_low_rank(Gc, rhs, lam_abs, rank)
        else:
            M = Gc + lam_abs[:, None, None] * torch.eye(m, dtype=G.dtype, device=G.device)
            L, info = torch.linalg.cholesky_ex(M)  # (F, m, m)
            if bool((info == 0).all()):
                X = torch.cholesky_solve(rhs.expand(len(finite), -1, -1), L)
            else:  # numerically singular: one by one, with the least-squares fallback
                X = torch.stack([_solve_spd(Mi, rhs) for Mi in M])
        X = X.reshape(len(finite), m, 1 + P, n)
        # W = (Ḡ + λI)⁻¹ C̄ + λ (Ḡ + λI)⁻¹ W_cᵀ, for each centre
        fits = X[:, :, :1] + lam_abs[:, None, None, None] * X[:, :, 1:]  # (F, m, P, n)
        W[finite] = fits.permute(0, 2, 3, 1)
    beta = (t - W @ s) / N  # (L, P, n)
    return W, beta


#: :func:`_ridge_fits` works in the range of the centred Gram when its rank bound
#: (samples + 8) times this is at most the number of unknowns.
RANGE_FACTOR = 4


def _shifted_solves_low_rank(Gc: Tensor, R: Tensor, shifts: Tensor, rank: int) -> Tensor:
    """``(Ḡ + λ I)⁻¹ R`` for every ``λ`` of ``shifts`` (all > 0), for ``Ḡ`` of low rank.

    A Gram of ``N`` samples has rank below ``N``: the range of ``Ḡ Ω`` for a random
    ``Ω`` (m, rank) is, almost surely, the range of ``Ḡ``; there ``Ḡ = U Λ Uᵀ`` from a
    (rank × rank) eigendecomposition, and

    .. math:: (Ḡ + λI)^{-1} R = U (Λ + λ)^{-1} U^T R + (R - U U^T R) / λ.

    Costs ``2 m² rank`` multiply-adds once, then ``m · rank`` per column and shift,
    instead of a Cholesky factorisation (``m³/3``) per shift.

    Returns
    -------
    Tensor, shape (F, m, R.shape[1])
    """
    m = Gc.shape[0]
    gen = torch.Generator().manual_seed(0x5EED)
    omega = torch.randn(m, rank, generator=gen, dtype=Gc.dtype).to(Gc.device)
    Q = torch.linalg.qr(Gc @ omega).Q  # (m, rank): an orthonormal basis of the range
    B = Q.T @ (Gc @ Q)
    evals, V = torch.linalg.eigh((B + B.T) / 2)
    U = Q @ V  # (m, rank)
    evals = evals.clamp_min(0)
    UR = U.T @ R  # (rank, cols)
    outside = R - U @ UR  # the part of R that Ḡ does not see
    inside = U @ (UR[None] / (evals[None, :, None] + shifts[:, None, None]))  # (F, m, cols)
    return inside + outside[None] / shifts[:, None, None]


def _sq_errors(sums: _Sums, W: Tensor, beta: Tensor) -> Tensor:
    """``‖Y − X_S Wᵀ − β‖²`` (absolute) of each fit, from the sums: W (..., n, m)."""
    err = sums.yy.sum() - 2 * (W * sums.C.T).sum((-2, -1)) + ((W @ sums.G) * W).sum((-2, -1))
    err = err + 2 * (beta * (W @ sums.s)).sum(-1) - 2 * beta @ sums.t
    return err + sums.N * (beta * beta).sum(-1)


def cv_lstsq(
    stats: PatchStats,
    keep: Tensor,
    weight: Tensor,
    *,
    grid: tuple[float, ...] | None = None,
    centers: tuple[str, ...] = CENTERS,
    max_outputs: int | None = CV_OUTPUTS,
) -> CVFit:
    """Least squares with a ridge towards a safe fit, its strength cross-validated.

    Solves, for every centre ``W_c`` (ThiNet's per-channel scale fit of the kept
    channels, or their original weights) and every ``λ`` of ``grid``,

    .. math:: \\min_{W, \\beta} \\sum \\|y - W x_S - \\beta\\|^2
              + \\lambda\\, \\|W - W_c\\|_F^2,

    on every fold's complement (``stats.rest(f)``, the centre fitted there too), scores
    each fit on the held-out fold (``stats.fold(f)``), and re-fits on all the data with
    the ``(centre, λ)`` of least summed held-out error. ``λ = 0`` is plain least
    squares (:func:`lstsq`), ``λ = ∞`` the centre itself (with its intercept re-fitted),
    so the choice never does worse, held out, than the best of those it was offered.
    Ties go to the larger ``λ``. With fewer than two non-empty folds there is nothing
    to hold out: ``λ`` is 0 (the plain fit).

    The choice is made on ``max_outputs`` of the consumer's outputs, evenly spaced
    (they share the Gram, so they share the over-fitting): the search then costs one
    Cholesky factorisation of the kept-patch Gram per fold and ``λ``.

    Parameters
    ----------
    stats : PatchStats
        Sums kept per fold (``stats.folds`` >= 2 for cross-validation), ``x`` from the
        partly pruned network and ``y`` the original output.
    keep : Tensor, shape (m,)
        Kept input channels.
    weight : Tensor, shape (n, c, k) or (n, c, kh, kw)
        The consumer's current weights, in the units of ``y``.
    grid : tuple of float, optional
        Ridge strengths in units of the mean diagonal of the centred kept-patch Gram.
        Default :data:`RIDGE_GRID`, or :data:`RIDGE_GRID_WIDE` above :data:`CV_WIDE`
        kept taps; ``λ = 0`` is left out when the training folds have fewer samples
        than there are unknowns (it interpolates them, and costs a factorisation).
    centers : tuple of str
        Any of :data:`CENTERS`.
    max_outputs : int or None
        Outputs the choice is made on (None: all).

    Returns
    -------
    CVFit
    """
    if not centers or any(c not in CENTERS for c in centers):
        raise ValueError(f"The 'centers' argument must hold some of {CENTERS}. Got {centers!r}.")
    m_taps = int(keep.numel()) * stats.taps
    if grid is None:
        grid = RIDGE_GRID if m_taps <= CV_WIDE else RIDGE_GRID_WIDE
        if stats.count * (stats.folds - 1) / max(stats.folds, 1) < m_taps + 1:
            grid = tuple(lam for lam in grid if lam > 0)
    if not grid or any(not (lam >= 0) for lam in grid):
        raise ValueError(f"The 'grid' argument must hold ridge strengths >= 0. Got {grid!r}.")
    centers = tuple(centers)
    idx = kept_taps(keep.to(stats.G.device), stats.taps)
    n = weight.shape[0]
    w_S = weight.reshape(n, stats.channels, stats.taps)[:, keep.to(weight.device)]
    w_S = w_S.reshape(n, -1).to(stats.G.device, torch.float64)  # (n, m*k)
    outputs = torch.arange(n, device=w_S.device)
    if max_outputs is not None and n > max_outputs:
        outputs = torch.linspace(0, n - 1, max_outputs, device=w_S.device).round().long()
    # The kept-tap blocks of every fold's sums: (K, m*k, m*k) and so on; then no d×d work.
    Gf = stats.kept_blocks(idx)
    Cf, sf, tf, yyf, nf = stats.Cf[:, idx], stats.sf[:, idx], stats.tf, stats.yyf, stats.nf

    # Every fold's sums, once: a fold's complement is then one subtraction (K - 1 folds
    # summed again for each held-out fold would cost K - 2 more passes over the Grams).
    whole = _Sums(Gf.sum(0), Cf.sum(0), sf.sum(0), tf.sum(0), yyf.sum(0), float(nf.sum()))

    def fold(f: int, out: Tensor | slice = slice(None)) -> _Sums:
        return _Sums(Gf[f], Cf[f][:, out], sf[f], tf[f][out], yyf[f][out], float(nf[f]))

    def rest(f: int) -> _Sums:
        return _Sums(*(a - b for a, b in zip(whole[:5], fold(f)[:5], strict=True)),
                     whole.N - float(nf[f]))  # fmt: skip

    def centres(data: _Sums, names: tuple[str, ...]) -> Tensor:  # (P, n, m*k)
        made = {"original": w_S}
        if "scale" in names:
            made["scale"] = _scale_centre(data, w_S, wtw, stats.taps)
        return torch.stack([made[c] for c in names])

    wtw = w_S.T @ w_S if "scale" in centers else None  # (m*k, m*k), shared by the folds
    live = [f for f in range(stats.folds) if float(nf[f]) > 0]
    heldout: dict[tuple[str, float], float] = {}
    if len(live) >= 2:
        total = torch.zeros(len(grid), len(centers), dtype=torch.float64, device=w_S.device)
        for f in live:
            train = rest(f)
            sub = train._replace(C=train.C[:, outputs], t=train.t[outputs], yy=train.yy[outputs])
            W, beta = _ridge_fits(sub, centres(train, centers)[:, outputs], grid)
            total += _sq_errors(fold(f, outputs), W, beta)
        yy = float(yyf[:, outputs].sum())
        for i, lam in enumerate(grid):
            for j, c in enumerate(centers):
                heldout[(c, lam)] = _relative(total[i, j], yy)
        order = {c: i for i, c in enumerate(centers)}
        # Least error; ties to the larger λ, then to the earlier centre.
        center, lam = min(heldout, key=lambda key: (heldout[key], -key[1], order[key[0]]))
    else:
        center, lam = centers[0], 0.0
    W, beta = _ridge_fits(whole, centres(whole, (center,)), (lam,))
    w, beta = W[0, 0], beta[0, 0]
    return CVFit(
        weight=w.contiguous(),
        bias_delta=beta.contiguous(),
        ridge=lam,
        center=center,
        heldout_error=heldout.get((center, lam), math.nan),
        heldout=heldout,
    )
