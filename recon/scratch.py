"""Training a pruned architecture from scratch: fresh, seeded initialisation.

"Rethinking the Value of Network Pruning" (Liu et al., 2019) trains each pruned
architecture again from random initialisation (Scratch-E, Scratch-B) and compares it
with fine-tuning the pruned weights. :func:`reinit` gives that starting point: the
same modules, shapes and sampler layers as a (pruned) model, with every parameter
drawn afresh.

This module sees modules only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["reinit"]


def reinit(
    model: nn.Module, seed: int, *, init: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """A copy of ``model`` with the same architecture and fresh, seeded initial weights.

    Every module that has a ``reset_parameters`` method (convolutions, linear layers,
    BatchNorms, ...) is reset to PyTorch's default initialisation, in the order of
    ``model.modules()``, from a generator seeded with ``seed``; BatchNorm running
    statistics are reset too (``reset_parameters`` does it). Everything else is
    copied as it is: the structure, sampler layers' channel indices, buffers of
    modules without ``reset_parameters``, the training flags and a pruning plan
    attached by :func:`recon.prune`. With ``init``, the architecture's own scheme is
    then applied: ``init(module)`` for every module, in the same order, from the same
    generator. The draws are made on the CPU, so the result is the same whatever the
    model's device; the global random state is left as it was.

    Parameters
    ----------
    model : nn.Module
        E.g. ``PruneResult.model``. Not modified.
    seed : int
        Seeds the initialisation (>= 0).
    init : callable, optional
        Called on each module after the reset, e.g. :meth:`recon.models.VGG.init_weights`
        or :meth:`recon.models.CifarResNet.init_weights` (what their constructors use):
        a pruned model then starts as its architecture would when built afresh, which
        is how Scratch-E/B train it.

    Returns
    -------
    nn.Module
        A new module, on the devices and dtypes of ``model``'s.

    Notes
    -----
    Without ``init`` the initialisation is PyTorch's default for each layer, not a
    model's own scheme (e.g. the Kaiming-normal convolutions of
    :func:`recon.models.vgg16`).

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> fresh = reinit(net, seed=0)
    >>> bool((fresh[0].weight != net[0].weight).any())
    True
    >>> torch.equal(reinit(net, seed=0)[0].weight, fresh[0].weight)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be a torch.nn.Module. Got {type(model).__name__} instead."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"The 'seed' argument must be an int >= 0. Got {seed!r} instead.")
    if init is not None and not callable(init):
        raise TypeError(
            "The 'init' argument must be a callable taking a module, or None. "
            f"Got {type(init).__name__} instead."
        )
    fresh = copy.deepcopy(model)
    places = {
        name: (t.device, t.dtype) for name, t in [*fresh.named_parameters(), *fresh.named_buffers()]
    }
    fresh.to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for module in fresh.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            if init is not None:
                for module in fresh.modules():
                    init(module)
    for name, t in [*fresh.named_parameters(), *fresh.named_buffers()]:
        device, dtype = places[name]
        t.data = t.data.to(device, dtype)
    return fresh
