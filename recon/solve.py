"""Re-fitting a consumer from its kept input channels, and error formulas.

All functions work from the sufficient statistics (:mod:`recon.stats`) alone: no
samples, no extra pass over the data. This module sees tensors only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .stats import PatchStats

__all__ = [
    "RECONSTRUCT",
    "channel_error",
    "kept_taps",
    "lstsq",
    "patch_error",
    "scale",
]

RECONSTRUCT = ("lstsq", "scale", "none")


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
