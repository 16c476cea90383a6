"""One ranking of per-channel scores across all units: Network Slimming's global threshold.

Liu et al. (2017) prune every channel whose BatchNorm ``|γ|`` lies below one threshold
chosen for the whole network, so that each layer's width falls out of the ranking
instead of being fixed beforehand. :func:`global_channels` does this for any score
method (``recon.prune(..., allocation="global")``): the channels of all units are
sorted by score, and the lowest are removed one at a time until the network's FLOPs
(:func:`recon.budget.achieved_speedup`, coupled through producers and consumers) meet
the ``speedup`` target within :data:`RTOL`.

This module sees tensors and :class:`recon.budget.BudgetUnit` only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import budget as _budget
from .scores import NORMALIZATIONS, normalize

__all__ = ["MIN_KEEP", "RTOL", "check_floor", "check_min_keep", "global_channels"]

#: The speedup reached lies within this relative distance of the target whenever the
#: ranking's steps are fine enough (one channel, or ``round_to`` channels, at a time).
RTOL = 0.02

#: The share of its channels that the ranking always leaves each unit. Scores are not
#: comparable enough across layers for a threshold to empty one safely: without a floor
#: the threshold left layers of the shipped VGG-16s with 1 of 128 channels
#: (docs/guide/baselines.md, "The floor").
MIN_KEEP = 0.25


def _removal_order(scores: Tensor) -> np.ndarray:
    """A unit's channels, first removed first: increasing score, ties to the higher index
    (the reverse of :func:`recon.select.score_order`, so every prefix of the removals
    leaves what :func:`recon.select.by_score` keeps)."""
    s = scores.detach().double().cpu().numpy()
    return np.argsort(-s, kind="stable")[::-1].copy()


def _floor(width: int, round_to: int, min_keep: float) -> int:
    """The fewest channels the ranking leaves a unit of ``width``: an allowed count."""
    low = max(_budget._min_count(width, round_to), math.ceil(min_keep * width - 1e-9))
    return min(_budget._round_up(low, round_to), width)


def check_min_keep(min_keep: object) -> float:
    """``min_keep`` if it is a float in [0, 1), else a ``ValueError`` naming it."""
    if isinstance(min_keep, bool) or not isinstance(min_keep, int | float) or not 0 <= min_keep < 1:
        raise ValueError(
            f"The 'min_keep' argument must be a float in [0, 1). Got {min_keep!r} instead."
        )
    return float(min_keep)


def check_floor(
    units: Sequence[_budget.BudgetUnit],
    *,
    speedup: float,
    module_flops: Mapping[str, int],
    total_flops: int,
    ignored_layers: Iterable[str] = (),
    round_to: int = 1,
    min_keep: float = MIN_KEEP,
) -> dict[str, int]:
    """The fewest channels :func:`global_channels` leaves each unit not ignored, after
    checking that the target can be met with them (a ``ValueError`` naming
    ``min_keep`` if not); no scores needed, so callers check before computing them."""
    check_min_keep(min_keep)
    ignored = set(ignored_layers)
    floor = {
        u.name: _floor(u.width, u.round_to(round_to), min_keep)
        for u in units
        if u.name not in ignored
    }
    widths = {u.name: u.width for u in units}
    most = _budget.achieved_speedup(units, {**widths, **floor}, module_flops, total_flops)
    if most < speedup * (1 - RTOL):
        raise ValueError(
            f"The 'min_keep' argument leaves every unit at least {min_keep:g} of its "
            f"channels (round_to={round_to}), which allows a speedup of at most {most:.4g}; "
            f"the target is {speedup:g}. Got min_keep={min_keep!r}: lower it or the target."
        )
    return floor


def global_channels(
    units: Sequence[_budget.BudgetUnit],
    scores: Mapping[str, Tensor],
    *,
    speedup: float,
    module_flops: Mapping[str, int],
    total_flops: int,
    ignored_layers: Iterable[str] = (),
    round_to: int = 1,
    normalization: str = "none",
    min_keep: float = MIN_KEEP,
) -> dict[str, int]:
    """Channels per unit from one threshold on the scores of all units' channels.

    Parameters
    ----------
    units : sequence of BudgetUnit
        The prunable units (as :func:`recon.budget.resolve_channels` takes them).
    scores : mapping of str to Tensor
        Per-channel scores, shape (width,), of every unit not ignored; larger is
        kept first (:func:`recon.scores.channel_scores`).
    speedup : float >= 1
        Target FLOPs ratio original / pruned.
    module_flops, total_flops
        Per-module and total FLOPs of the unpruned network
        (:func:`recon.budget.count_flops`).
    ignored_layers : iterable of str, default ()
        Units that keep all their channels and take no part in the ranking.
    round_to : int >= 1, default 1
        Each unit keeps a multiple of ``round_to`` channels (or its full width).
    normalization : {"none", "mean"}, default "none"
        How scores are made comparable across units (:func:`recon.scores.normalize`):
        as they are, or each unit's divided by its mean.
    min_keep : float in [0, 1), default MIN_KEEP (0.25)
        Every unit keeps at least ``ceil(min_keep * width)`` channels (rounded up to a
        multiple of ``round_to``), whatever its scores; 0 lets the threshold take a
        unit down to ``min(round_to, width)`` channels, as Network Slimming does.

    Returns
    -------
    dict of str to int
        Channels kept per unit.

    Notes
    -----
    With the scores of every free unit's channels sorted increasingly (ties: the unit
    listed first, then within a unit as :func:`recon.select.by_score`), removing the
    first ``j`` leaves unit ``u`` with ``k_u(j) = width_u − r_u(j)`` channels, rounded
    up to an allowed count; a unit stops losing channels at its floor,
    ``max(min(round_to, width), ceil(min_keep · width))`` rounded up likewise, so no
    layer is removed whole. The FLOPs ``F(k(j))`` decrease with ``j``; the
    smallest ``j`` with ``F(k(j)) ≤ F / speedup`` is found by bisection, and ``j`` or
    ``j − 1``, whichever speedup is nearer the target (in ratio), is returned. A
    threshold ``t`` on the scores is the same thing: ``j`` counts the scores below
    ``t``.

    Examples
    --------
    >>> from recon.budget import BudgetUnit
    >>> a = BudgetUnit("a", 4, out_modules=("c1",), in_modules=("c2",))
    >>> b = BudgetUnit("b", 4, out_modules=("c2",), in_modules=("c3",))
    >>> scores = {"a": torch.tensor([4.0, 3, 2, 1]), "b": torch.tensor([0.1, 0.2, 9, 9])}
    >>> global_channels([a, b], scores, speedup=1.42, module_flops={"c1": 40, "c2": 40,
    ...     "c3": 20}, total_flops=100, min_keep=0)
    {'a': 4, 'b': 2}

    ``b``'s two weakest channels go first (FLOPs 100 → 70), before any of ``a``.
    """
    units = _budget._check_units(units)
    widths = {u.name: u.width for u in units}
    ignored = _budget._check_ignored(ignored_layers, widths)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"The 'round_to' argument must be an int >= 1. Got {round_to!r} instead.")
    if not isinstance(normalization, str) or normalization not in NORMALIZATIONS:
        raise ValueError(
            f"The 'normalization' argument must be one of {NORMALIZATIONS}. "
            f"Got {normalization!r} instead."
        )
    free = [u.name for u in units if u.name not in ignored]
    for name in free:
        s = scores.get(name) if isinstance(scores, Mapping) else None
        if not isinstance(s, Tensor) or tuple(s.shape) != (widths[name],):
            raise ValueError(
                f"The 'scores' argument must map every unit not ignored to a Tensor of its "
                f"width. Got {getattr(s, 'shape', type(s).__name__)} for '{name}' (width "
                f"{widths[name]}) instead."
            )
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"The 'scores' argument has non-finite scores for '{name}'.")
    # Checks speedup and the FLOPs arguments, and that the target is reachable.
    _budget.resolve_channels(
        units,
        speedup=speedup,
        ignored_layers=ignored,
        round_to=round_to,
        module_flops=module_flops,
        total_flops=total_flops,
    )
    floor = check_floor(
        units,
        speedup=speedup,
        module_flops=module_flops,
        total_flops=total_flops,
        ignored_layers=ignored,
        round_to=round_to,
        min_keep=min_keep,
    )
    result = dict(widths)
    if speedup == 1 or not free:
        return result

    # The global removal order: (unit index, channels removed so far in that unit).
    values, owner = [], []
    for i, name in enumerate(free):
        s = normalize(scores[name].detach().double().cpu(), normalization)
        removable = widths[name] - floor[name]
        order = _removal_order(s)[:removable]
        values.append(s.numpy()[order])
        owner.append(np.full(len(order), i))
    flat_values = np.concatenate(values)
    flat_owner = np.concatenate(owner)
    ranked = flat_owner[np.argsort(flat_values, kind="stable")]  # unit of each removal
    # removed[j, u]: channels of unit u among the first j removals, as a running count
    steps = len(ranked)
    width_arr = np.array([widths[n] for n in free])
    unit_steps = {u.name: u.round_to(round_to) for u in units}

    def counts(j: int) -> dict[str, int]:
        removed = np.bincount(ranked[:j], minlength=len(free))
        out = dict(result)
        for name, w, r in zip(free, width_arr, removed, strict=True):
            k = int(w - r)
            step = unit_steps[name]
            out[name] = int(w) if k == w else min(_budget._round_up(k, step), int(w))
        return out

    def speedup_of(j: int) -> float:
        return _budget.achieved_speedup(units, counts(j), module_flops, total_flops)

    lo, hi = 0, steps  # speedup_of(lo) < target <= speedup_of(hi)
    if speedup_of(hi) < speedup:
        return counts(hi)  # rounding keeps more than resolve_channels' bound: the most
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if speedup_of(mid) >= speedup:
            hi = mid
        else:
            lo = mid
    best = min((hi, lo), key=lambda j: abs(math.log(speedup_of(j) / speedup)))
    reached = speedup_of(best)
    if abs(reached / speedup - 1) > RTOL:
        warnings.warn(
            f"allocation='global' reaches a speedup of {reached:.4g} for a target of "
            f"{speedup:g}: one more channel (or round_to={round_to} channels) of the "
            "ranking changes the FLOPs by more than 2 % here",
            stacklevel=3,
        )
    return counts(best)
