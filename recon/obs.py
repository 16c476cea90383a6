"""Greedy channel removal on the re-fitted least-squares error (group Optimal Brain Surgeon).

LASSO and ThiNet choose channels on a proxy — the error of the original weights
scaled per channel — and the consumer is re-fitted by least squares afterwards. Here
the choice is made on the error that the re-fit leaves. For the consumer's patch
statistics ``G = Σ x xᵀ``, ``C = Σ x yᵀ`` (intercept included by centring them) the
re-fitted error of keeping the channel set ``S`` is

.. math:: E(S) = \\min_{W, \\beta} \\sum \\|y - W x_S - \\beta\\|^2
          + \\varepsilon \\|W\\|_F^2 .

Channels are removed one at a time, each time the channel ``g`` whose removal raises
``E`` least. From the optimum ``W`` (d, n) of the current set and ``H⁻¹`` (the
inverse of its regularised Gram), forcing channel ``g``'s ``taps`` rows to zero while
the others re-fit costs exactly (Hassibi & Stork's Optimal Brain Surgeon, for a group
of weights, as Frantar & Alistarh's OBC applies it to structured pruning)

.. math:: \\Delta E_g = \\operatorname{tr}\\bigl(W_g^\\top [H^{-1}]_{gg}^{-1} W_g\\bigr),

after which ``W ← W − H⁻¹_{:g} [H⁻¹]_{gg}⁻¹ W_g`` and
``H⁻¹ ← H⁻¹ − H⁻¹_{:g} [H⁻¹]_{gg}⁻¹ H⁻¹_{g:}``. Each removal costs ``O(d²·taps)``; the
nested order and the error after every removal come out of one run; the removed
channels' rows leave the problem every so often, so later removals are cheaper.

A wide consumer calibrated on few images has fewer samples ``N`` than patch entries
``d``: its centred Gram is ``FᵀF`` for a factor ``F`` of ``r < N`` rows (a pivoted
Cholesky factor, :mod:`recon.lowrank`), and ``H⁻¹ = (I − Fᵀ(εI + FFᵀ)⁻¹F)/ε`` needs only
an ``r × r`` inverse: the start costs ``O(d·r²)`` instead of ``O(d³)`` and a removal
``O(d·r·taps)`` instead of ``O(d²·taps)`` (:class:`_LowRank`; the same choices, up to
round-off). And the costs depend on ``C`` only through ``BBᵀ`` (``B`` the centred
``C``), so with fewer samples than outputs ``B`` is replaced by ``d × rank`` columns.

This module sees tensors only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lowrank import Gram, pivoted_cholesky

__all__ = ["removal_order", "removal_order_shared"]

#: Ridge ``ε`` relative to the mean diagonal of the centred Gram.
RIDGE = 1e-6
#: Removals' columns gathered before ``H⁻¹`` is updated by one matrix product.
FLUSH_COLUMNS = 256
#: The low-rank form (:class:`_LowRank`) is tried where the samples times this are at
#: most the patch entries ``d``.
LOW_RANK_FACTOR = 2.5
#: :class:`_LowRank`'s updates are used where the factor's rank times this is at most
#: ``d``; above, :class:`_Greedy`'s, from ``H⁻¹`` formed from the factor.
LOW_RANK_UPDATES = 4
#: The low-rank factor's residual ``‖Ḡ − FᵀF‖₂`` is at most this times the ridge ``ε``.
LOW_RANK_TOL = 1e-6
#: Output directions with ``BᵀB``'s eigenvalues below this times its largest are left out.
OUTPUT_TOL = 1e-13


def removal_order(
    G: Tensor | Gram,
    C: Tensor,
    taps: int,
    *,
    s: Tensor | None = None,
    t: Tensor | None = None,
    count: float | None = None,
    steps: int | None = None,
    ridge: float = RIDGE,
) -> tuple[Tensor, Tensor]:
    """Channels in the order greedy backward elimination removes them, with the errors.

    Parameters
    ----------
    G : Tensor, shape (c*taps, c*taps), or Gram
        ``Σ x xᵀ`` of the consumer's input patches, channel-major (channel ``i`` owns
        rows ``i*taps .. i*taps+taps-1``); as a :class:`recon.lowrank.Gram`, read by rows
        where the low-rank form needs only some (fewer samples than patch entries).
    C : Tensor, shape (c*taps, n)
        ``Σ x yᵀ`` with the target outputs.
    taps : int
        Patch entries per channel (``kh*kw``; 1 for a channel problem).
    s, t, count : optional
        ``Σ x`` (c*taps,), ``Σ y`` (n,) and the number of samples: with them the
        consumer's bias is re-fitted too (the sums are centred); without, no intercept.
    steps : int, optional
        Stop after this many removals. Default ``c - 1`` (the whole order).
    ridge : float
        ``ε`` relative to the mean diagonal of the (centred) Gram.

    Returns
    -------
    order : Tensor, shape (steps,), int64
        Removed channels, first removed first.
    increase : Tensor, shape (steps,), float64
        The rise of ``E`` (absolute, in the units of ``Σ‖y‖²``) at each removal.
    """
    c = _check(G, C, taps)
    steps = c - 1 if steps is None else steps
    if not 0 <= steps <= c - 1:
        raise ValueError(f"The 'steps' argument must be in [0, {c - 1}]. Got {steps!r}.")
    state = _state(G, C, taps, s=s, t=t, count=count, ridge=ridge)
    return _greedy([state], [1.0], steps)


def removal_order_shared(
    problems: list[dict], weights: list[float], *, steps: int | None = None
) -> Tensor:
    """:func:`removal_order` for several consumers reading the same channels.

    ``problems`` holds each consumer's keyword arguments of :func:`removal_order`
    (``G``, ``C``, ``taps`` and optionally ``s``, ``t``, ``count``, ``ridge``); the
    channel removed at each step is the one whose removal raises ``Σ_r w_r E_r`` least,
    every consumer re-fitting its own weights. Returns the removed channels in order.
    """
    widths = {_check(p["G"], p["C"], p["taps"]) for p in problems}
    if len(widths) != 1 or len(weights) != len(problems):
        raise ValueError("The problems must have one width, and one weight each.")
    c = widths.pop()
    steps = c - 1 if steps is None else steps
    states = [_state(**p) for p in problems]
    return _greedy(states, weights, steps)[0]


def _greedy(states: list, weights: list[float], steps: int) -> tuple[Tensor, Tensor]:
    """The greedy removals on ``Σ_r w_r E_r`` of ``states``: order and increases."""
    order = torch.empty(steps, dtype=torch.int64)
    increase = torch.empty(steps, dtype=torch.float64)
    for step in range(steps):
        cost = sum(w * st.costs() for w, st in zip(weights, states, strict=True))
        g = int(torch.argmin(cost))
        order[step], increase[step] = g, max(float(cost[g]), 0.0)
        states = [st.remove(g) for st in states]
    return order, increase


def _check(G: Tensor | Gram, C: Tensor, taps: int) -> int:
    shape = tuple(G.shape) if isinstance(G, Tensor) else (G.diag.shape[0],) * 2
    d = shape[0]
    if taps < 1 or d % taps or shape != (d, d) or C.shape[0] != d:
        raise ValueError(
            f"G must be (c*taps, c*taps) and C (c*taps, n) with taps={taps}. "
            f"Got {shape} and {tuple(C.shape)}."
        )
    return d // taps


def _state(
    G: Tensor | Gram,
    C: Tensor,
    taps: int,
    *,
    s: Tensor | None = None,
    t: Tensor | None = None,
    count: float | None = None,
    ridge: float = RIDGE,
) -> _Greedy | _LowRank:
    """The greedy's state for one consumer: :class:`_LowRank` where the centred Gram's
    rank (below ``count``) is well below its size ``d``, else :class:`_Greedy`."""
    gram = G if isinstance(G, Gram) else Gram.of(G)
    d = gram.diag.shape[0]
    centred = s is not None and t is not None and bool(count)
    Bd = C.double()
    if centred:
        s64, t64, N = s.double(), t.double(), float(count)
        diag = gram.diag.double() - s64 * s64 / N
        B = Bd - torch.outer(s64, t64) / N
    else:
        diag, B = gram.diag.double().clone(), Bd.clone()
    mean_diag = float(diag.sum()) / d
    eps = ridge * mean_diag + 1e-12
    if centred and 4 * (float(count) - 1) <= 3 * B.shape[1]:  # rank(B) < N: fewer outputs
        B = _compress_outputs(B)
    if centred and float(count) * LOW_RANK_FACTOR <= d:

        def rows(index: Tensor) -> Tensor:
            return gram.rows(index).double() - torch.outer(s64[index], s64) / N

        F = pivoted_cholesky(
            rows, diag, max_rank=int(count) + 8, tol=LOW_RANK_TOL * eps
        )  # Ḡ ≈ FᵀF, F of shape (r, d), r < count
        if F is not None and F.shape[0] * LOW_RANK_UPDATES <= d:
            return _LowRank(F, B, taps, eps)
        if F is not None:  # H⁻¹ = (I − Fᵀ K⁻¹ F)/ε: O(d²·r) instead of O(d³)
            return _Greedy(_inverse_low_rank(F, eps), B, taps)
    H = gram.full().double().clone()
    if centred:
        H -= torch.outer(s64, s64) / N
    return _Greedy(_inverse(H, eps, mean_diag), B, taps)


def _inverse(H: Tensor, eps: float, mean_diag: float) -> Tensor:
    """``(H + εI)⁻¹`` (``H`` is consumed), with a larger ridge where ``H`` is not positive
    semidefinite beyond round-off (float32 block products, a singular Gram)."""
    H.diagonal().add_(eps)
    L, info = torch.linalg.cholesky_ex(H)
    for jitter in (1e-6, 1e-4, 1e-2):
        if not int(info):
            break
        H.diagonal().add_(jitter * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        raise ValueError(
            "The 'G' argument is not positive semidefinite: no Cholesky factor with a "
            "ridge of up to 1e-2 of its mean diagonal."
        )
    del H
    return torch.cholesky_inverse(L)


def _inverse_low_rank(F: Tensor, eps: float) -> Tensor:
    """``(FᵀF + εI)⁻¹ = (I − Fᵀ (εI + FFᵀ)⁻¹ F)/ε`` for ``F`` (r, d)."""
    L = torch.linalg.cholesky(_kernel(F, eps))
    P = torch.linalg.solve_triangular(L, F, upper=False)  # L⁻¹F
    Hinv = P.T @ P
    Hinv.neg_()
    Hinv.diagonal().add_(1.0)
    return Hinv.div_(eps)


def _compress_outputs(B: Tensor) -> Tensor:
    """``B̃`` (d, n') with ``B̃B̃ᵀ = BBᵀ`` and fewer columns where ``B`` (d, n) has rank
    below ``n`` (fewer samples than outputs): every quantity of the greedy (the costs
    ``tr(W_gᵀ [H⁻¹]_gg⁻¹ W_g)`` with ``W = H⁻¹B``) depends on ``B`` through ``BBᵀ`` only,
    and the updates of ``W`` act on its rows."""
    d, n = B.shape
    if n < 32 or n > d:
        return B
    lam, V = torch.linalg.eigh(B.T @ B)  # ascending
    keep = lam > OUTPUT_TOL * float(lam[-1].clamp_min(1e-300))
    if 4 * int(keep.sum()) > 3 * n:
        return B
    return B @ V[:, keep]


class _Greedy:
    """One consumer's re-fitted optimum during greedy removal (see the module docstring).

    ``Hinv`` (d, d) is the inverse of the regularised centred Gram (updated in place),
    ``B`` (d, n) the centred cross term."""

    def __init__(
        self, Hinv: Tensor, B: Tensor, taps: int, names: Tensor | None = None, c: int = 0
    ) -> None:
        d = Hinv.shape[0]
        m, n = d // taps, B.shape[1]
        self.taps, self.n, self.c = taps, n, max(c, m)
        self.Hinv = Hinv  # (d, d)
        self.W = self.Hinv @ B  # (d, n): the optimum with every channel
        # the channel of each block (all of them, or those a _LowRank state had left)
        self.names = torch.arange(m, device=B.device) if names is None else names
        self.alive = torch.ones(m, dtype=torch.bool, device=B.device)
        self.eye = torch.eye(taps, dtype=B.dtype, device=B.device)
        ar = torch.arange(m, device=B.device)
        # H⁻¹'s diagonal blocks, (m, taps, taps)
        self.diag = self.Hinv.view(m, taps, m, taps)[ar, :, ar, :].clone()
        # H⁻¹ is updated lazily: the current one is ``Hinv − UM Uᵀ`` with the columns
        # ``U`` (d, R) of the removals since the last flush and ``UM`` their
        # ``U_g [H⁻¹]_gg⁻¹``: one GEMM every FLUSH_COLUMNS columns instead of a rank-
        # ``taps`` update per removal. A flush comes before the buffers fill up.
        width = FLUSH_COLUMNS + taps
        self.U = B.new_empty(d, width)
        self.UM = B.new_empty(d, width)
        self.r = 0

    def costs(self) -> Tensor:
        """The rise of the error on removing each channel, (c,); inf for removed ones."""
        return _costs(self)

    def remove(self, channel: int) -> _Greedy:
        """Force ``channel``'s weights to zero; the others re-fit. Returns the state."""
        taps = self.taps
        g = int(torch.nonzero(self.names == channel)[0, 0])
        rows = slice(g * taps, (g + 1) * taps)
        r, U, UM = self.r, self.U, self.UM
        cols = self.Hinv[:, rows].clone()  # (d, taps): the current H⁻¹'s columns of g
        if r:
            cols.addmm_(UM[:, :r], U[rows, :r].T, alpha=-1)
        inv = _downdate(self, g, cols)
        U[:, r : r + taps] = cols
        torch.mm(cols, inv, out=UM[:, r : r + taps])
        self.r = r + taps
        compact = 4 * int(self.alive.sum()) <= 3 * len(self.names)
        if self.r >= FLUSH_COLUMNS or compact:
            self.Hinv.addmm_(UM[:, : self.r], U[:, : self.r].T, alpha=-1)
            self.r = 0
            if compact:  # drop the removed channels' rows
                keep = _compact(self)
                self.Hinv = self.Hinv[keep][:, keep]
                self.U, self.UM = U[keep], UM[keep]
        return self


class _LowRank:
    """:class:`_Greedy` for a centred Gram of low rank, ``Ḡ ≈ FᵀF`` with ``F`` (r, d):
    ``H = FᵀF + εI`` and ``H⁻¹ = (I − Fᵀ K⁻¹ F)/ε`` with ``K = εI + FFᵀ`` (r, r).

    Removing channel ``g`` drops its columns ``F_g`` from ``F``, so ``K`` loses
    ``F_g F_gᵀ``; with ``a = K⁻¹F_g``, the removed channel's columns of ``H⁻¹`` are
    ``(E_g − Fᵀa)/ε`` and ``K⁻¹ ← K⁻¹ + a [H⁻¹]_gg⁻¹ aᵀ / ε``. A removal costs
    ``O(d·r·taps)`` instead of :class:`_Greedy`'s ``O(d²·taps)``, and the start
    ``O(d·r²)`` instead of ``O(d³)``."""

    def __init__(self, F: Tensor, B: Tensor, taps: int, eps: float) -> None:
        r, d = F.shape
        c, n = d // taps, B.shape[1]
        self.taps, self.n, self.c, self.eps = taps, n, c, eps
        self.Ft = F.T.contiguous()  # (d, r); a removed channel's rows are zero
        L = torch.linalg.cholesky(_kernel(F, eps))  # K ≥ εI: positive definite
        self.Kinv = torch.cholesky_inverse(L)  # (r, r)
        P = torch.linalg.solve_triangular(L, F, upper=False)  # (r, d): L⁻¹F
        # W = H⁻¹B = (B − Fᵀ K⁻¹ F B)/ε
        self.W = (B - P.T @ (P @ B)) / eps  # (d, n)
        self.B = B
        Pg = P.view(r, c, taps).permute(1, 0, 2)  # (c, r, taps)
        self.eye = torch.eye(taps, dtype=B.dtype, device=B.device)
        # [H⁻¹]_gg = (I − P_gᵀP_g)/ε, (m, taps, taps)
        self.diag = (self.eye - Pg.transpose(1, 2) @ Pg) / eps
        self.names = torch.arange(c, device=B.device)
        self.alive = torch.ones(c, dtype=torch.bool, device=B.device)

    def costs(self) -> Tensor:
        """The rise of the error on removing each channel, (c,); inf for removed ones."""
        return _costs(self)

    def remove(self, channel: int) -> _LowRank | _Greedy:
        """Force ``channel``'s weights to zero; the others re-fit. Returns the state: a
        :class:`_Greedy` once the channels left have no more patch entries than
        ``LOW_RANK_UPDATES`` times the factor's rank (``K`` is then ill-conditioned, and
        the dense form is as cheap)."""
        taps, eps, Ft = self.taps, self.eps, self.Ft
        g = int(torch.nonzero(self.names == channel)[0, 0])
        rows = slice(g * taps, (g + 1) * taps)
        a = self.Kinv @ Ft[rows].T  # (r, taps): K⁻¹F_g
        cols = Ft @ a  # (d, taps): H⁻¹'s columns of g are (E_g − Fᵀa)/ε
        cols[rows] -= self.eye
        cols.div_(-eps)
        inv = _downdate(self, g, cols)
        self.Kinv.addmm_(a, inv @ a.T, alpha=1 / eps)
        Ft[rows] = 0
        if 4 * int(self.alive.sum()) <= 3 * len(self.names):  # drop the removed channels
            keep = _compact(self)
            self.Ft, self.B = Ft[keep], self.B[keep]
            d, r = self.Ft.shape
            if d <= LOW_RANK_UPDATES * r:  # H⁻¹ of what is left, afresh
                H = self.Ft @ self.Ft.T
                Hinv = _inverse(H, eps, float(H.diagonal().sum()) / d)
                return _Greedy(Hinv, self.B, taps, names=self.names, c=self.c)
            # K⁻¹ afresh from what is left (the rank-taps updates accumulate round-off)
            self.Kinv = torch.cholesky_inverse(torch.linalg.cholesky(_kernel(self.Ft.T, eps)))
        return self


def _kernel(F: Tensor, eps: float) -> Tensor:
    """``εI + FFᵀ`` for ``F`` (r, d)."""
    K = F @ F.T
    K.diagonal().add_(eps)
    return K


def _costs(state: _Greedy | _LowRank) -> Tensor:
    """The rise of the error on removing each channel, (c,); inf for removed ones."""
    taps = state.taps
    m = len(state.names)
    if taps == 1:  # scalar blocks (1×1 convolutions, channel problems)
        cost = torch.linalg.vector_norm(state.W, dim=1).square() / state.diag.view(m)
    else:
        Wg = state.W.view(m, taps, -1)
        # tr(W_gᵀ B_g⁻¹ W_g) = Σ B_g⁻¹ ∘ (W_g W_gᵀ): small inverses (a batched solve with
        # n right-hand sides is far slower on the CPU)
        WW = torch.bmm(Wg, Wg.transpose(1, 2))
        cost = (torch.linalg.inv_ex(state.diag)[0] * WW).sum((1, 2))
    out = torch.full((state.c,), torch.inf, dtype=cost.dtype, device=cost.device)
    out[state.names] = torch.where(state.alive, cost, torch.inf)
    return out.cpu()


def _downdate(state: _Greedy | _LowRank, g: int, cols: Tensor) -> Tensor:
    """Remove block ``g`` (local index) given ``H⁻¹``'s columns ``cols`` (d, taps) of it:
    update ``W`` and the diagonal blocks; returns ``[H⁻¹]_gg⁻¹``."""
    taps = state.taps
    m = len(state.names)
    rows = slice(g * taps, (g + 1) * taps)
    W = state.W
    inv = torch.linalg.inv(cols[rows])  # (taps, taps)
    W.addmm_(cols, inv @ W[rows], alpha=-1)
    W[rows] = 0  # zero already, up to round-off
    cb = cols.view(m, taps, taps)  # every block's rows of the columns
    state.diag -= cb @ inv @ cb.transpose(1, 2)
    state.alive[g] = False
    state.diag[~state.alive] = state.eye  # removed: any invertible block (cost unused)
    return inv


def _compact(state: _Greedy | _LowRank) -> Tensor:
    """Drop the removed channels' rows of ``W`` and blocks; returns the kept rows (d,)."""
    keep = state.alive.repeat_interleave(state.taps)
    state.W = state.W[keep]
    state.names, state.diag = state.names[state.alive], state.diag[state.alive]
    state.alive = state.alive[state.alive]
    return keep
