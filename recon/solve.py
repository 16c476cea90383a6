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

from .lowrank import Gram, pivoted_cholesky
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
    error : float
        Relative error ``Σ‖Y − X_S Wᵀ − β‖² / Σ‖Y‖²`` of the returned fit on all the data,
        every output (:func:`patch_error`'s).
    error_given : float
        The same for the kept channels' weights as given (no intercept change): the
        error before the re-fit.
    """

    weight: Tensor
    bias_delta: Tensor
    ridge: float
    center: str
    heldout_error: float
    heldout: dict[tuple[str, float], float] = field(default_factory=dict)
    error: float = math.nan
    error_given: float = math.nan


class _Sums(NamedTuple):
    """Kept-tap blocks of patch statistics: ``G`` (m, m), ``C`` (m, n), ``s`` (m,),
    ``t`` (n,), ``yy`` (n,) per output, ``N`` samples."""

    G: Tensor
    C: Tensor
    s: Tensor
    t: Tensor
    yy: Tensor
    N: float


def _scale_sums(Gf: Tensor, Cf: Tensor, w_S: Tensor, taps: int) -> tuple[Tensor, Tensor]:
    """Every fold's channel problem of the kept channels' weights ``w_S`` (n, m*k): ``A_f``
    (K, m, m) and ``b_f`` (K, m) (:func:`recon.stats.channel_gram` of its sums), from which
    the scale fit of any set of folds follows by summing."""
    K, mk, n = Cf.shape
    m = mk // taps
    wtw = w_S.T @ w_S  # (m*k, m*k)
    A = torch.stack([(G * wtw).reshape(m, taps, m, taps).sum(dim=(1, 3)) for G in Gf])
    b = (Cf * w_S.T).reshape(K, m, taps, n).sum(dim=(2, 3))
    return A, b


def _scale_centre(A: Tensor, b: Tensor, w_S: Tensor, taps: int) -> Tensor:
    """ThiNet's per-channel scale fit of the kept channels' weights ``w_S`` (n, m*k), from
    their channel problem ``A`` (m, m), ``b`` (m,)."""
    m = A.shape[0]
    eps = 1e-6 * float(A.diagonal().sum()) / max(m, 1) + 1e-12
    s = _solve_spd(A + eps * torch.eye(m, dtype=A.dtype, device=A.device), b[:, None])[:, 0]
    return w_S * s.repeat_interleave(taps)[None]


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
            X = _shifted_solves(Gc, rhs, lam_abs)
        X = X.reshape(len(finite), m, 1 + P, n)
        # W = (Ḡ + λI)⁻¹ C̄ + λ (Ḡ + λI)⁻¹ W_cᵀ, for each centre
        fits = X[:, :, :1] + lam_abs[:, None, None, None] * X[:, :, 1:]  # (F, m, P, n)
        W[finite] = fits.permute(0, 2, 3, 1)
    beta = (t - W @ s) / N  # (L, P, n)
    return W, beta


#: :func:`_ridge_fits` works in the range of the centred Gram when its rank bound
#: (samples + 8) times this is at most the number of unknowns.
RANGE_FACTOR = 4


def _shifted_solves(Gc: Tensor, rhs: Tensor, shifts: Tensor) -> Tensor:
    """``(Gc + λ_f I)⁻¹ rhs`` for each shift ``λ_f``: (F, m, r), one batched Cholesky
    factorisation; where one is numerically singular, each by :func:`_solve_spd`."""
    eye = torch.eye(Gc.shape[0], dtype=Gc.dtype, device=Gc.device)
    M = Gc + shifts[:, None, None] * eye
    L, info = torch.linalg.cholesky_ex(M)  # (F, m, m)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs.expand(len(shifts), -1, -1), L)
    return torch.stack([_solve_spd(Mi, rhs) for Mi in M])  # least-squares fallback


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


def _fold(Gf, Cf, sf, tf, yyf, nf, f: int, out: Tensor | slice = slice(None)) -> _Sums:
    """Fold ``f``'s sums, the outputs ``out`` of its ``C``, ``t`` and ``yy``."""
    return _Sums(Gf[f], Cf[f][:, out], sf[f], tf[f][out], yyf[f][out], float(nf[f]))


#: :func:`cv_lstsq` works in the span of the samples' patches (:class:`_FoldSpace`) where
#: the samples times this are at most the unknowns.
FOLD_SPACE_FACTOR = 1.5
#: ... factoring each fold's Gram to a residual of at most this times the smallest ridge.
FOLD_TOL = 1e-9


class _FoldSpace(NamedTuple):
    """The span of every fold's patches, where the samples are fewer than the unknowns.

    Fold ``f``'s Gram is ``G_f = F_fᵀF_f`` with ``F_f`` of at most ``N_f`` rows (a
    pivoted Cholesky factor); ``Q`` (m, p), ``p ≤ N + K``, is an orthonormal basis of
    the rows of every ``F_f`` and of every ``s_f``, so every fold's ``G_f``, ``C_f`` and
    ``s_f`` live in it: with ``Ĝ_f = QᵀG_fQ`` (p, p), the ridge fit of any set of folds
    is, for ``W = Q a + W_⊥``,

    .. math:: a = (Q^\\top \\bar G Q + λI)^{-1} Q^\\top (\\bar C + λ W_c^\\top), \\qquad
              W_⊥ = (I - QQ^\\top)(\\bar C / λ + W_c^\\top),

    and ``W_⊥`` is invisible to every fold's sums. One factorisation of the folds serves
    every fold's complement: ``O(m·p²)`` once, then a Cholesky factorisation of a (p, p)
    matrix per fold and ``λ`` instead of one of an (m, m) matrix (``O(m³)``).
    """

    Q: Tensor  # (m, p)
    G: Tensor  # (K, p, p): QᵀG_fQ
    s: Tensor  # (K, p): Qᵀs_f
    diag: Tensor  # (K,): trace of G_f
    F: tuple[Tensor, ...]  # F_f (r_f, m): G_f ≈ F_fᵀF_f

    def scale_sums(self, Cf: Tensor, w_S: Tensor, taps: int) -> tuple[Tensor, Tensor]:
        """:func:`_scale_sums` from the factors: ``A_f = Σ_{r,o} z_{ro} z_{ro}ᵀ`` with
        ``z_{ro,i} = Σ_p F_f[r, (i,p)] W[o, (i,p)]``, channel ``i``'s contribution to
        output ``o`` of the factor's row ``r`` (as of a sample): ``O(r_f·n·m²)`` instead
        of ``O(n·m²k²)`` and no (m·k)² products."""
        K, mk, n = Cf.shape
        m = mk // taps
        wv = w_S.reshape(n, m, taps).permute(1, 2, 0)  # (m, k, n)
        A = Cf.new_empty(K, m, m)
        for f, F in enumerate(self.F):
            Fv = F.reshape(-1, m, taps).transpose(0, 1)  # (m, r, k)
            Z = torch.bmm(Fv, wv).reshape(m, -1)  # (m, r·n)
            torch.mm(Z, Z.T, out=A[f])
        b = (Cf * w_S.T).reshape(K, m, taps, n).sum(dim=(2, 3))
        return A, b

    def quad(self, W: Tensor) -> Tensor:
        """``tr(W G Wᵀ)`` of the whole Gram ``G = Σ_f G_f`` for ``W`` (n, m)."""
        return sum(torch.linalg.matrix_norm(F @ W.T).square() for F in self.F)

    def heldout(self, f, QC, tf, yyf, nf, centres, grid, outputs) -> Tensor:
        """``Σ‖Y_f − X_f Wᵀ − β‖²`` (L, P) of the fits on every fold but ``f``, for the
        outputs ``outputs``; ``QC`` (K, p, n_out) holds every fold's ``QᵀC_f`` of them."""
        Q, m = self.Q, self.Q.shape[0]
        rest = [g for g in range(self.G.shape[0]) if g != f]
        G, s, C = self.G[rest].sum(0), self.s[rest].sum(0), QC[rest].sum(0)
        t, N = tf[rest].sum(0)[outputs], float(nf[rest].sum())
        unit = (float(self.diag[rest].sum()) - float(s @ s) / N) / m
        eps = 1e-6 * float(self.diag[rest].sum()) / m + 1e-12  # as lstsq()
        Wc = Q.T @ centres.transpose(1, 2)  # (P, p, n_out)
        shifts = [lam if math.isinf(lam) else lam * unit + eps for lam in grid]
        a = _coef_fits(G, s, C, t, N, Wc, shifts)  # (L, P, p, n_out)
        beta = (t - (a * s[:, None]).sum(-2)) / N  # (L, P, n_out)
        Ch, Gh, sh = QC[f], self.G[f], self.s[f]
        tt, yy, Nf = tf[f][outputs], yyf[f][outputs], float(nf[f])
        err = yy.sum() - 2 * (a * Ch).sum((-2, -1)) + (a * (Gh @ a)).sum((-2, -1))
        err = err + 2 * (beta * (a * sh[:, None]).sum(-2)).sum(-1) - 2 * beta @ tt
        return err + Nf * (beta * beta).sum(-1)

    def fit(self, whole: _Sums, centre: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        """The fit on all the data, every output: ``W`` (n, m) and ``β`` (n,)."""
        Q, m = self.Q, self.Q.shape[0]
        G, s, N = self.G.sum(0), whole.s, whole.N
        sh = self.s.sum(0)
        trace = float(self.diag.sum())
        unit = (trace - float(s @ s) / N) / m
        shift = lam * unit + 1e-6 * trace / m + 1e-12
        Cc = whole.C - torch.outer(s, whole.t) / N  # (m, n)
        QC, Wc = Q.T @ Cc, Q.T @ centre.T  # (p, n)
        a = _coef_fits(G, sh, QC + torch.outer(sh, whole.t) / N, whole.t, N, Wc[None], [shift])
        # W = Q a + (I − QQᵀ)(C̄/λ + W_cᵀ)
        W = Q @ (a[0, 0] - QC / shift - Wc) + Cc / shift + centre.T  # (m, n)
        beta = (whole.t - W.T @ s) / N
        return W.T, beta


def _coef_fits(G, s, C, t, N: float, Wc: Tensor, shifts: list[float]) -> Tensor:
    """Ridge fits in the coordinates of a :class:`_FoldSpace`: ``a`` (L, P, p, n) for the
    shifts ``λ`` (``inf``: the centre) and centres ``Wc`` (P, p, n), from the uncentred
    ``G`` (p, p), ``s`` (p,), ``C`` (p, n), ``t`` (n,) of ``N`` samples: one Cholesky
    factorisation of a (p, p) matrix per finite shift."""
    Gc = G - torch.outer(s, s) / N
    Gc = (Gc + Gc.T) / 2
    Cc = C - torch.outer(s, t) / N
    P, p, n = Wc.shape
    finite = [i for i, lam in enumerate(shifts) if not math.isinf(lam)]
    out = Wc.new_empty(len(shifts), P, p, n)
    for i, lam in enumerate(shifts):
        if math.isinf(lam):
            out[i] = Wc
    if finite:
        lam = torch.tensor([shifts[i] for i in finite], dtype=G.dtype, device=G.device)
        rhs = torch.cat([Cc, *Wc], dim=1)  # (p, n * (1 + P))
        X = _shifted_solves(Gc, rhs, lam)
        X = X.reshape(len(finite), p, 1 + P, n)
        # a = (Ḡ + λI)⁻¹ C̄ + λ (Ḡ + λI)⁻¹ W_c, for each centre
        out[finite] = (X[:, :, :1] + lam[:, None, None, None] * X[:, :, 1:]).permute(0, 2, 1, 3)
    return out


def _fold_space(
    grams: list[Gram], sf: Tensor, nf: Tensor, traces: Tensor, whole: _Sums, lam: float
) -> _FoldSpace | None:
    """:class:`_FoldSpace` of the folds' sums (``grams``: each fold's ``G_f``, read by
    rows; ``traces``: their traces), or None where their Grams are not of low rank to
    within :data:`FOLD_TOL` of the smallest ridge ``lam`` (relative) applies."""
    K, m = sf.shape
    N = whole.N
    trace = float(traces.sum())
    unit = (trace - float(whole.s @ whole.s) / N) / m
    tol = FOLD_TOL * (lam * unit + 1e-6 * trace / m + 1e-12) / K
    factors = []
    for f in range(K):
        F = pivoted_cholesky(grams[f].rows, grams[f].diag, max_rank=int(nf[f]) + 8, tol=tol)
        if F is None:
            return None
        factors.append(F)
    S = torch.cat([F.T for F in factors] + [sf.T], dim=1)  # (m, p0)
    if S.shape[1] >= m:
        return None
    Q, R = torch.linalg.qr(S)  # (m, p0), (p0, p0)
    G, start = [], 0
    for F in factors:  # F_f Q = R's columns of fold f, transposed
        Rf = R[:, start : start + F.shape[0]]
        G.append(Rf @ Rf.T)
        start += F.shape[0]
    return _FoldSpace(Q, torch.stack(G), R[:, -K:].T.contiguous(), traces, tuple(factors))


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
    idx = kept_taps(keep.to(stats.Cf.device), stats.taps)
    n = weight.shape[0]
    w_S = weight.reshape(n, stats.channels, stats.taps)[:, keep.to(weight.device)]
    w_S = w_S.reshape(n, -1).to(stats.Cf.device, torch.float64)  # (n, m*k)
    outputs = torch.arange(n, device=w_S.device)
    if max_outputs is not None and n > max_outputs:
        outputs = torch.linspace(0, n - 1, max_outputs, device=w_S.device).round().long()
    # The kept-tap blocks of every fold's sums: (K, m*k, m*k) and so on; then no d×d work.
    Cf, sf, tf, yyf, nf = stats.Cf[:, idx], stats.sf[:, idx], stats.tf, stats.yyf, stats.nf
    K = stats.folds
    # Every fold's sums, once: a set of folds is then a sum (its complement a subtraction).
    # The whole Gram only where it is used (not in the span of the samples, see below).
    whole = _Sums(None, Cf.sum(0), sf.sum(0), tf.sum(0), yyf.sum(0), float(nf.sum()))
    live = [f for f in range(K) if float(nf[f]) > 0]
    finite = [lam for lam in grid if not math.isinf(lam)]
    space = None
    if len(live) >= 2 and finite and whole.N * FOLD_SPACE_FACTOR <= m_taps:
        # every fold's kept-tap block read by rows: no (K, m*k, m*k) gather
        grams = [_kept_rows(stats, f, idx) for f in range(K)]
        traces = torch.stack([g.diag.sum() for g in grams])  # (K,)
        space = _fold_space(grams, sf, nf, traces, whole, min(finite))
    if space is None:
        Gf = stats.kept_blocks(idx)  # (K, m*k, m*k)
        whole = whole._replace(G=Gf.sum(0))
        quad = lambda W: ((W @ whole.G) * W).sum()  # noqa: E731
    else:
        QC = space.Q.T @ Cf[:, :, outputs]  # (K, p, n_out)
        quad = space.quad
    if "scale" in centers:
        if space is None:
            Af, bf = _scale_sums(Gf, Cf, w_S, stats.taps)  # (K, m, m), (K, m)
        else:
            Af, bf = space.scale_sums(Cf, w_S, stats.taps)
        A_all, b_all = Af.sum(0), bf.sum(0)

    def centres(names: tuple[str, ...], f: int | None = None) -> Tensor:  # (P, n, m*k)
        """The centres fitted on every fold but ``f`` (None: on all the data)."""
        made = {"original": w_S}
        if "scale" in names:
            A, b = (A_all, b_all) if f is None else (A_all - Af[f], b_all - bf[f])
            made["scale"] = _scale_centre(A, b, w_S, stats.taps)
        return torch.stack([made[c] for c in names])

    heldout: dict[tuple[str, float], float] = {}
    if len(live) >= 2:
        total = torch.zeros(len(grid), len(centers), dtype=torch.float64, device=w_S.device)
        for f in live:
            cen = centres(centers, f)[:, outputs]  # (P, n_out, m*k)
            if space is not None:  # in the span of the samples' patches
                total += space.heldout(f, QC, tf, yyf, nf, cen, grid, outputs)
                continue
            held = _fold(Gf, Cf, sf, tf, yyf, nf, f)
            train = _Sums(*(a - b for a, b in zip(whole[:5], held[:5], strict=True)),
                          whole.N - held.N)  # fmt: skip
            sub = train._replace(C=train.C[:, outputs], t=train.t[outputs], yy=train.yy[outputs])
            W, beta = _ridge_fits(sub, cen, grid)
            total += _sq_errors(_fold(Gf, Cf, sf, tf, yyf, nf, f, outputs), W, beta)
        yy = float(yyf[:, outputs].sum())
        for i, lam in enumerate(grid):
            for j, c in enumerate(centers):
                heldout[(c, lam)] = _relative(total[i, j], yy)
        order = {c: i for i, c in enumerate(centers)}
        # Least error; ties to the larger λ, then to the earlier centre.
        center, lam = min(heldout, key=lambda key: (heldout[key], -key[1], order[key[0]]))
    else:
        center, lam = centers[0], 0.0
    if math.isinf(lam):  # the centre, its intercept re-fitted
        w = centres((center,))[0]
        beta = (whole.t - w @ whole.s) / whole.N
    elif space is not None:
        w, beta = space.fit(whole, centres((center,))[0], lam)
    else:
        W, beta = _ridge_fits(whole, centres((center,)), (lam,))
        w, beta = W[0, 0], beta[0, 0]
    yy = float(whole.yy.sum())
    return CVFit(
        weight=w.contiguous(),
        bias_delta=beta.contiguous(),
        ridge=lam,
        center=center,
        heldout_error=heldout.get((center, lam), math.nan),
        heldout=heldout,
        error=_relative(_whole_error(whole, quad, w, beta), yy),
        error_given=_relative(_whole_error(whole, quad, w_S, None), yy),
    )


def _kept_rows(stats: PatchStats, f: int, idx: Tensor) -> Gram:
    """Fold ``f``'s Gram of the patch entries ``idx``, ``G_f[idx][:, idx]``, read by rows."""
    Gf = stats.Gf
    return Gram(
        Gf[f].diagonal()[idx],
        lambda index: Gf[f, idx[index][:, None], idx[None, :]],
        lambda: Gf[f, idx[:, None], idx[None, :]],
    )


def _whole_error(whole: _Sums, quad, W: Tensor, beta: Tensor | None) -> Tensor:
    """``Σ‖y − W x_S − β‖²`` (absolute) on all the data, as :func:`patch_error`, with
    ``quad(W) = tr(W G Wᵀ)``; no intercept change where ``beta`` is None."""
    err = whole.yy.sum() - 2 * (W.T * whole.C).sum() + quad(W)
    if beta is not None:
        err = err + 2 * beta @ (W @ whole.s) - 2 * beta @ whole.t + whole.N * beta @ beta
    return err
