"""Grouped convolutions: a unit's problem split by group, and equal shares per group.

A grouped consumer conv with ``G`` groups (ResNeXt's and RegNet's 3×3) computes

.. math::

    Y_g = X_g W_g^\\top \\qquad (g = 1..G),

outputs ``g`` reading only input channels ``g`` (``c/G`` channels, ``n/G`` outputs each).
Its weight as a dense ``(n, c, k)`` tensor is block diagonal (:func:`dense_weight`), so
the channel problem ``A, b`` is block diagonal too and the re-fit of one group's
outputs sees only that group's channels: a unit with a grouped consumer is ``G``
independent problems, each on its own slice of the statistics
(:func:`recon.stats.PatchStats.subset`) keeping ``k/G`` channels. A grouped *producer*
only needs each group to keep the same number of its outputs; :func:`quota_order`
turns any nested order of the channels into one whose every prefix of ``j·G`` channels
holds ``j`` of each group.

This module sees tensors only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dense_weight", "group_slices", "quota_order"]


def dense_weight(weight: Tensor, groups: int) -> Tensor:
    """The dense ``(n, c, k)`` equivalent of a grouped conv's ``(n, c/G, k)`` weight.

    Output ``o`` of group ``g = o // (n/G)`` reads channels ``g·c/G .. (g+1)·c/G - 1``;
    every other entry is zero.

    Examples
    --------
    >>> w = torch.ones(4, 1, 1)  # 4 outputs, 2 groups of 1 channel
    >>> dense_weight(w, 2)[:, :, 0]
    tensor([[1., 0.],
            [1., 0.],
            [0., 1.],
            [0., 1.]])
    """
    if groups == 1:
        return weight
    n, cpg, k = weight.shape
    if n % groups:
        raise ValueError(
            f"The 'weight' argument must have a multiple of groups={groups} outputs. "
            f"Got {n} instead."
        )
    npg = n // groups
    out = weight.new_zeros(groups, npg, groups, cpg, k)
    g = torch.arange(groups, device=weight.device)
    out[g, :, g] = weight.reshape(groups, npg, cpg, k)
    return out.reshape(n, groups * cpg, k)


def group_slices(width: int, outputs: int, groups: int) -> list[tuple[slice, slice]]:
    """Each group's (channels, outputs) slices, for ``groups`` groups."""
    cpg, npg = width // groups, outputs // groups
    return [(slice(g * cpg, (g + 1) * cpg), slice(g * npg, (g + 1) * npg)) for g in range(groups)]


def quota_order(order: Tensor, width: int, groups: int) -> Tensor:
    """Reorder a nested channel order so every prefix of ``j·groups`` holds ``j`` per group.

    Channel ``i`` belongs to group ``i // (width/groups)``. Level ``j`` is each group's
    ``j``-th channel in ``order``; levels come one after the other, and within a level
    the channels keep their places in ``order``. With one group, ``order`` itself.

    Examples
    --------
    >>> quota_order(torch.tensor([0, 1, 2, 3]), 4, 2)  # groups {0, 1} and {2, 3}
    tensor([0, 2, 1, 3])
    """
    if groups == 1:
        return order
    group = torch.div(order, width // groups, rounding_mode="floor")
    onehot = torch.nn.functional.one_hot(group, groups)  # (width, G)
    level = (onehot.cumsum(0) * onehot).sum(1) - 1  # its rank within its group
    rank = torch.arange(len(order), device=order.device)
    return order[torch.argsort(level * len(order) + rank)]
