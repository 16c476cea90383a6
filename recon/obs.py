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

This module sees tensors only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["removal_order", "removal_order_shared"]

#: Ridge ``ε`` relative to the mean diagonal of the centred Gram.
RIDGE = 1e-6
#: Removals' columns gathered before ``H⁻¹`` is updated by one matrix product.
FLUSH_COLUMNS = 256


def removal_order(
    G: Tensor,
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
    G : Tensor, shape (c*taps, c*taps)
        ``Σ x xᵀ`` of the consumer's input patches, channel-major (channel ``i`` owns
        rows ``i*taps .. i*taps+taps-1``).
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
    state = _Greedy(G, C, taps, s=s, t=t, count=count, ridge=ridge)
    order = torch.empty(steps, dtype=torch.int64)
    increase = torch.empty(steps, dtype=torch.float64)
    for step in range(steps):
        cost = state.costs()
        g = int(torch.argmin(cost))
        order[step], increase[step] = g, max(float(cost[g]), 0.0)
        state.remove(g)
    return order, increase


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
    states = [_Greedy(**p) for p in problems]
    order = torch.empty(steps, dtype=torch.int64)
    for step in range(steps):
        cost = sum(w * st.costs() for w, st in zip(weights, states, strict=True))
        g = int(torch.argmin(cost))
        order[step] = g
        for st in states:
            st.remove(g)
    return order


def _check(G: Tensor, C: Tensor, taps: int) -> int:
    d = G.shape[0]
    if taps < 1 or d % taps or G.shape != (d, d) or C.shape[0] != d:
        raise ValueError(
            f"G must be (c*taps, c*taps) and C (c*taps, n) with taps={taps}. "
            f"Got {tuple(G.shape)} and {tuple(C.shape)}."
        )
    return d // taps


class _Greedy:
    """One consumer's re-fitted optimum during greedy removal (see the module docstring)."""

    def __init__(
        self,
        G: Tensor,
        C: Tensor,
        taps: int,
        *,
        s: Tensor | None = None,
        t: Tensor | None = None,
        count: float | None = None,
        ridge: float = RIDGE,
    ) -> None:
        d = G.shape[0]
        c, n = d // taps, C.shape[1]
        H = G.double().clone()
        B = C.double().clone()
        if s is not None and t is not None and count:
            s64, t64 = s.double(), t.double()
            H -= torch.outer(s64, s64) / float(count)
            B -= torch.outer(s64, t64) / float(count)
        mean_diag = float(H.diagonal().sum()) / d
        eps = ridge * mean_diag + 1e-12
        H.diagonal().add_(eps)
        L, info = torch.linalg.cholesky_ex(H)
        for jitter in (1e-6, 1e-4, 1e-2):  # not positive definite beyond round-off (float32
            if not int(info):  # block products, a singular Gram): a larger ridge
                break
            H.diagonal().add_(jitter * mean_diag)
            L, info = torch.linalg.cholesky_ex(H)
        if int(info):
            raise ValueError(
                "The 'G' argument is not positive semidefinite: no Cholesky factor with a "
                "ridge of up to 1e-2 of its mean diagonal."
            )
        self.taps, self.n, self.c = taps, n, c
        self.Hinv = torch.cholesky_inverse(L)  # (d, d)
        self.W = self.Hinv @ B  # (d, n): the optimum with every channel
        self.names = torch.arange(c, device=H.device)  # the channel of each block
        self.alive = torch.ones(c, dtype=torch.bool, device=H.device)
        self.eye = torch.eye(taps, dtype=H.dtype, device=H.device)
        ar = torch.arange(c, device=H.device)
        # H⁻¹'s diagonal blocks, (m, taps, taps)
        self.diag = self.Hinv.view(c, taps, c, taps)[ar, :, ar, :].clone()
        # H⁻¹ is updated lazily: the current one is ``Hinv − UM Uᵀ`` with the columns
        # ``U`` (d, R) of the removals since the last flush and ``UM`` their
        # ``U_g [H⁻¹]_gg⁻¹``: one GEMM every FLUSH_COLUMNS columns instead of a rank-
        # ``taps`` update per removal. A flush comes before the buffers fill up.
        width = FLUSH_COLUMNS + taps
        self.U = H.new_empty(d, width)
        self.UM = H.new_empty(d, width)
        self.r = 0

    def costs(self) -> Tensor:
        """The rise of the error on removing each channel, (c,); inf for removed ones."""
        taps, n = self.taps, self.n
        m = len(self.names)
        Wg = self.W.view(m, taps, n)
        # tr(W_gᵀ B_g⁻¹ W_g) = Σ B_g⁻¹ ∘ (W_g W_gᵀ): small inverses (a batched solve with
        # n right-hand sides is far slower on the CPU)
        cost = (torch.linalg.inv_ex(self.diag)[0] * torch.bmm(Wg, Wg.transpose(1, 2))).sum((1, 2))
        out = torch.full((self.c,), torch.inf, dtype=cost.dtype, device=cost.device)
        out[self.names] = torch.where(self.alive, cost, torch.inf)
        return out.cpu()

    def remove(self, channel: int) -> None:
        """Force ``channel``'s weights to zero; the others re-fit."""
        taps = self.taps
        g = int(torch.nonzero(self.names == channel)[0, 0])
        m = len(self.names)
        rows = slice(g * taps, (g + 1) * taps)
        r, U, UM, W = self.r, self.U, self.UM, self.W
        cols = self.Hinv[:, rows].clone()  # (d, taps): the current H⁻¹'s columns of g
        if r:
            cols.addmm_(UM[:, :r], U[rows, :r].T, alpha=-1)
        inv = torch.linalg.inv(cols[rows])  # (taps, taps)
        W.addmm_(cols, inv @ W[rows], alpha=-1)
        W[rows] = 0  # zero already, up to round-off
        cb = cols.view(m, taps, taps)  # every block's rows of the columns
        self.diag -= cb @ inv @ cb.transpose(1, 2)
        self.alive[g] = False
        self.diag[~self.alive] = self.eye  # removed: any invertible block (cost unused)
        U[:, r : r + taps] = cols
        torch.mm(cols, inv, out=UM[:, r : r + taps])
        self.r = r + taps
        compact = 4 * int(self.alive.sum()) <= 3 * m
        if self.r >= FLUSH_COLUMNS or compact:
            self.Hinv.addmm_(UM[:, : self.r], U[:, : self.r].T, alpha=-1)
            self.r = 0
            if compact:  # drop the removed channels' rows
                keep = self.alive.repeat_interleave(taps)
                self.W, self.Hinv = W[keep], self.Hinv[keep][:, keep]
                self.names, self.diag = self.names[self.alive], self.diag[self.alive]
                self.alive = self.alive[self.alive]
                self.U, self.UM = U[keep], UM[keep]
