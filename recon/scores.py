"""Per-channel importance scores of a unit, for the score-based selection methods.

The score methods (:data:`recon.select.SCORE_METHODS`) keep the channels of a unit with
the largest scores (:func:`recon.select.by_score`). For channel ``i`` of a unit:

- ``l1`` (Li et al., 2017): ``Σ |W|`` of the producer's filter ``i`` (for a sampler
  unit, which has no producer of its own, of the consumer's weights reading ``i``);
- ``max_response``: ``Σ |W|`` of the consumer's weights reading channel ``i``;
- ``apoz`` (Hu et al., 2016, "Network Trimming"): ``1 − APoZ_i``, the fraction of
  non-zero values of channel ``i`` in the activation the consumer reads (after its
  ReLU), over every position of the calibration images. The zeros are counted in the
  pass that gathers the unit's statistics (:meth:`recon.stats.PatchStats.count_zeros`),
  so APoZ costs no pass of its own; channels that are mostly zero go first;
- ``bn_gamma`` (Liu et al., 2017, "Network Slimming"): ``|γ_i|`` of the BatchNorm
  right after the producer, the channel's scale after normalisation.

For ``allocation="global"`` the scores of every unit are needed before any unit is
pruned: :func:`global_scores` takes them from the original network (``apoz`` in one
forward pass over the calibration images), and :func:`normalize` makes them
comparable across units or not (see :mod:`recon.ranking`).

This module sees a unit's modules and statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import distributed as _dist
from .graph import Unit
from .select import SCORE_METHODS
from .stats import ChannelStats, PatchStats, zero_counts
from .surgery import channel_offset, consumer_weight

__all__ = ["NORMALIZATIONS", "channel_scores", "check_scores", "global_scores", "normalize"]

#: How per-unit scores are scaled before one ranking across units (:func:`normalize`).
NORMALIZATIONS = ("none", "mean")


def _first_bn(unit: Unit, model: nn.Module) -> str | None:
    """Name of the first BatchNorm between the unit's producer and its consumer, or None.

    In an inverted residual (expand conv -> BN -> depthwise conv -> BN -> project conv)
    it is the one right after the producer.
    """
    if unit.producer is None:
        return None
    names = (n for n in unit.channelwise if isinstance(model.get_submodule(n), nn.BatchNorm2d))
    return next(names, None)


def _bn_of(unit: Unit, model: nn.Module) -> nn.Module | None:
    """The BatchNorm right after the unit's producer, with a scale ``γ``, or None."""
    name = _first_bn(unit, model)
    bn = None if name is None else model.get_submodule(name)
    return bn if getattr(bn, "weight", None) is not None else None


def check_scores(method: str, units: Sequence[Unit], model: nn.Module) -> None:
    """Raise before any work if ``method`` has no score for one of ``units``.

    Only ``bn_gamma`` can fail: it needs a BatchNorm with an affine scale between each
    unit's producer and its consumer.
    """
    if method != "bn_gamma":
        return
    for unit in units:
        if _bn_of(unit, model) is not None:
            continue
        if unit.producer is None:
            why = (
                "it is a sampler unit, whose channels (a residual block's input) have no "
                "BatchNorm of their own; pass sampler_layers=False"
            )
        elif _first_bn(unit, model) is not None:
            why = f"its BatchNorm '{_first_bn(unit, model)}' has no scale (affine=False)"
        else:
            why = f"no BatchNorm lies between '{unit.producer}' and '{unit.consumer}'"
        raise ValueError(
            f"The 'method' argument 'bn_gamma' needs a BatchNorm scale after every pruned "
            f"producer. Got unit '{unit.name}' without one: {why}. Use another method, or "
            f"leave the unit whole with ignored_layers=['{unit.name}']."
        )


def channel_scores(
    method: str,
    unit: Unit,
    model: nn.Module,
    stats: PatchStats | ChannelStats | None = None,
) -> Tensor:
    """The unit's per-channel scores for a score method (see the module docstring).

    Parameters
    ----------
    method : {"l1", "max_response", "apoz", "bn_gamma"}
    unit : Unit
    model : nn.Module
        The network holding the unit's modules (as it is when the unit is pruned).
    stats : PatchStats or ChannelStats, optional
        The unit's statistics, with their zero counts; needed for ``"apoz"``.

    Returns
    -------
    Tensor, shape (width,), float64
        Larger is kept first.
    """
    if method not in SCORE_METHODS:
        raise ValueError(
            f"The 'method' argument must be one of {SCORE_METHODS}. Got {method!r} instead."
        )
    if method == "bn_gamma":
        check_scores(method, [unit], model)
        return _bn_of(unit, model).weight.detach().abs().to(torch.float64)
    if method == "apoz":
        if stats is None:
            raise ValueError("The 'stats' argument is required for method 'apoz'. Got None.")
        return 1.0 - stats.apoz
    if method == "l1" and unit.producer is not None and unit.consumer_kind != "heads":
        producer = model.get_submodule(unit.producer)
        # summed in the weights' dtype, as recon always has (the same ties, bit for bit)
        return producer.weight.detach().abs().reshape(unit.width, -1).sum(1).double()
    w = consumer_weight(model.get_submodule(unit.consumer), unit, channel_offset(model, unit))
    return w.abs().sum(dim=(0, 2), dtype=torch.float64)


def global_scores(
    method: str,
    units: Sequence[Unit],
    original: nn.Module,
    batches: Sequence[Tensor],
    ctx: _dist.Context | None = None,
) -> dict[str, Tensor]:
    """Every unit's scores in the original network, before any unit is pruned.

    For ``"apoz"`` this is one forward pass of ``original`` over ``batches`` that
    counts the zeros of each consumer's input; in a distributed run the counts are
    summed over the processes, so every rank gets the same scores. The other methods
    read weights only.
    """
    check_scores(method, units, original)
    if method != "apoz":
        return {u.name: channel_scores(method, u, original).cpu() for u in units}
    zeros = {u.name: torch.zeros(u.width, dtype=torch.float64) for u in units}
    entries = torch.zeros(len(units), dtype=torch.float64)
    hooks = []
    for i, unit in enumerate(units):
        off = channel_offset(original, unit)  # a concatenated unit: its slice

        def count(module, args, unit=unit, i=i, off=off) -> None:
            x = args[0] if unit.cat_lead is None else args[0][:, off : off + unit.width]
            z, e = zero_counts(x, unit.width)
            zeros[unit.name] += z.cpu()
            entries[i] += e

        hooks.append(original.get_submodule(unit.consumer).register_forward_pre_hook(count))
    try:
        with torch.no_grad():
            for batch in batches:
                original(batch)
    finally:
        for h in hooks:
            h.remove()
    sums = [*zeros.values(), entries]
    if ctx is not None:
        ctx.all_reduce_(sums, "zero counts (APoZ)")
    return {
        u.name: 1.0 - (sums[i] / sums[-1][i] if float(sums[-1][i]) > 0 else sums[i] * 0)
        for i, u in enumerate(units)
    }


def normalize(scores: Tensor, how: str) -> Tensor:
    """Scale one unit's scores before they are ranked with other units' scores.

    ``"none"``: as they are (Network Slimming's one threshold on the raw ``|γ|``; APoZ
    is a fraction, comparable as it is). ``"mean"``: divided by the unit's mean score,
    so that each unit's scores average 1 and only their spread within the unit decides
    (for scores whose scale differs between layers, like the weight norms of ``l1``
    and ``max_response``, which grow with the fan-in). A unit whose scores are all 0
    stays 0.

    Examples
    --------
    >>> normalize(torch.tensor([1.0, 3.0]), "mean")
    tensor([0.5000, 1.5000])
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"The 'how' argument must be one of {NORMALIZATIONS}. Got {how!r}.")
    if how == "none":
        return scores
    mean = scores.mean()
    return scores / mean if float(mean) > 0 else scores
