"""Low-rank factors of Gram matrices, for the solvers of :mod:`recon.obs` and :mod:`recon.solve`.

A Gram ``G = Σ x xᵀ`` of ``N`` samples has rank at most ``N``; a wide consumer (``d``
patch entries) calibrated on few images has ``N < d``, and then everything the solvers
need lives in a space of ``N`` dimensions: with ``G = FᵀF`` for ``F`` of shape
``(r, d)``, ``r ≤ N``,

.. math:: (G + \\varepsilon I)^{-1} = \\frac{1}{\\varepsilon}
          \\bigl(I - F^\\top (\\varepsilon I + F F^\\top)^{-1} F\\bigr),

an ``r × r`` inverse instead of a ``d × d`` one. ``F`` comes from a pivoted Cholesky
factorisation, which reads ``r`` rows of ``G`` instead of all of it: ``O(d·r²)`` work
where a factorisation of ``G`` costs ``O(d³)``.

This module sees tensors only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Gram", "pivoted_cholesky"]


class Gram(NamedTuple):
    """A symmetric ``d × d`` Gram matrix read as a factorisation reads it: its diagonal,
    some of its rows, or (for a dense factorisation) the whole of it. Statistics kept
    per fold (:class:`recon.stats.PatchStats`) give their total this way without
    summing whole Grams."""

    diag: Tensor  # (d,)
    rows: Callable[[Tensor], Tensor]  # index (b,) -> G[index], (b, d)
    full: Callable[[], Tensor]  # () -> G, (d, d)

    @staticmethod
    def of(G: Tensor) -> Gram:
        """A Gram held whole."""
        return Gram(G.diagonal(), G.__getitem__, lambda: G)


#: Candidate rows examined per block of :func:`pivoted_cholesky`.
BLOCK = 32


def pivoted_cholesky(
    rows: Callable[[Tensor], Tensor],
    diag: Tensor,
    *,
    max_rank: int,
    tol: float,
    block: int = BLOCK,
) -> Tensor | None:
    """``F`` (r, d) with ``G ≈ FᵀF``, or None when ``max_rank`` rows do not suffice.

    Greedy diagonal pivoting in blocks (the "accelerated" pivoted Cholesky of Epperly,
    Tropp and Webber, 2024, with the largest residual diagonals as candidates): each block
    reads the rows of ``G`` of the ``block`` largest residual diagonals, factors them with
    pivoting among themselves and keeps the pivots that are not small next to the block's
    first one. The factorisation stops when the residual ``G − FᵀF`` (positive
    semidefinite for a positive semidefinite ``G``) has a trace of at most ``tol``; then
    ``‖G − FᵀF‖₂ ≤ tol``.

    Parameters
    ----------
    rows : callable
        ``rows(index)`` returns ``G[index]``, shape (len(index), d): ``G`` is never needed
        whole.
    diag : Tensor, shape (d,)
        ``G``'s diagonal.
    max_rank : int
        The most rows ``F`` may have.
    tol : float
        The residual trace at which to stop (absolute).
    block : int
        Candidates per block.

    Returns
    -------
    Tensor, shape (r, d), or None
        ``F``, in ``diag``'s dtype and device; None when the residual trace is still
        above ``tol`` after ``max_rank`` rows (``G`` is not of low rank).
    """
    d = diag.shape[0]
    max_rank = min(max_rank, d)
    F = diag.new_zeros(max_rank, d)
    resid = diag.clone()
    r = 0
    while True:
        resid.clamp_min_(0)
        top = torch.topk(resid, min(block, d))
        total = float(resid.sum())
        if total <= tol:
            return F[:r]
        if r >= max_rank:
            return None
        cand = top.indices
        R = rows(cand).to(F)  # (b, d)
        if r:
            R -= F[:r, cand].T @ F[:r]  # the candidates' residual rows
        # Pivoted Cholesky of the candidates among themselves, on their rows.
        first = float(top.values[0])
        taken = []
        for _ in range(min(len(cand), max_rank - r)):
            dg = R[torch.arange(len(cand), device=R.device), cand]  # residual diagonals
            if taken:
                dg[torch.tensor(taken, device=R.device)] = -math.inf
            j = int(torch.argmax(dg))
            piv = float(dg[j])
            if not piv > max(1e-3 * first, 0.0) or piv <= tol / d:
                break
            row = R[j] / math.sqrt(piv)
            F[r] = row
            r += 1
            taken.append(j)
            R -= torch.outer(row[cand], row)  # the other candidates' rows, updated
            resid -= row * row
        if not taken:  # round-off: nothing left that counts
            return F[:r] if float(resid.clamp_min(0).sum()) <= tol else None
