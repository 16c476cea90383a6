"""The network output's change under many separate layer perturbations, from one backward pass.

The allocation profile (:mod:`recon.profile`) needs, for every unit, the relative
output error ``‖f'(x) − f(x)‖² / ‖f(x)‖²`` of the network with that unit alone pruned
(its probe). Linearised at the original network, a perturbation ``δ_u`` of consumer
``u``'s output changes the output by ``J_u δ_u``. With ``v`` a vector of independent
±1 entries (one per output entry and image),

.. math:: \\mathbb{E}_v\\bigl[(v^\\top J_u \\delta_u)^2\\bigr] = \\|J_u \\delta_u\\|^2,
          \\qquad v^\\top J_u \\delta_u = \\langle J_u^\\top v, \\delta_u \\rangle ,

and ``J_uᵀ v`` is the gradient of ``vᵀ f`` at consumer ``u``'s output: one backward
pass gives it for every consumer at once. So one forward pass (which also computes
each ``δ_u`` from the consumer's input, as the pruned consumer would see it) and one
backward pass per batch estimate every unit's output error, unbiased, with the
spatial and channel correlations of its error and of the Jacobian included (a
Hutchinson-type estimate, averaged over the images). What it leaves out is the
network's curvature beyond first order. It replaces a forward pass of held-out
images per unit (the ``"probe"`` sensitivity of :func:`recon.profile.profile_units`).

The caller's model is not changed: the gradients are taken with
:func:`torch.autograd.grad` with respect to the input only (no parameter's ``.grad``
is touched), through identity nodes placed by forward hooks that are removed after.

This module sees the network, the named modules and the calibration batches; what a
perturbation is comes from the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["SENSITIVITY_IMAGES", "linearised_output_errors"]

#: Calibration images (the first ones) the backward passes run on.
SENSITIVITY_IMAGES = 256
#: Images per backward pass (bounds the activations kept for it).
CHUNK = 16

#: ``delta(input, output) -> (δ, reference)``: a perturbation ``δ`` of a module's output
#: (its shape), computed from the module's input and output of the same batch, and what
#: it is an error of (the layer's own output, as its statistics measure it), or None.
Delta = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


class _Tap(torch.autograd.Function):
    """Identity; its backward adds ``⟨g, δ⟩`` per image into ``acc`` (B,)."""

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, acc: Tensor) -> Tensor:  # type: ignore[override]
        ctx.delta, ctx.acc = delta, acc
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        prod = (g.double() * ctx.delta.double()).reshape(g.shape[0], -1).sum(1)
        ctx.acc += prod.to(ctx.acc.device)
        return g, None, None


def linearised_output_errors(
    model: nn.Module,
    perturbations: Mapping[str, Sequence[tuple[str, Delta]]],
    batches: Sequence[Tensor],
    flatten: Callable[[object], Tensor],
    *,
    offsets: Sequence[int] | None = None,
    images: int = SENSITIVITY_IMAGES,
    seed: int = 0,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> tuple[dict[str, float], dict[str, float], int]:
    """Relative output error of each perturbation, to first order, from one backward pass.

    Parameters
    ----------
    model : nn.Module
        The network, in eval mode.
    perturbations : mapping of str to sequence of (str, Delta)
        For each key, the modules it perturbs and how: ``(name, delta)`` with
        ``delta(input, output)`` the change of module ``name``'s output (a key may
        perturb several modules at once, e.g. every reader of a unit's channels).
        The keys' perturbations are measured separately, each alone.
    batches : sequence of Tensor
        Calibration batches; the images of global index below ``images`` are used.
    flatten : callable
        The model's output as one ``(B, m)`` tensor.
    offsets : sequence of int, optional
        Global index of each batch's first image (default: consecutive from 0).
    images : int
        How many calibration images, the first ones, to use.
    seed : int
        Seed of the signs ``v``: image ``i`` gets the same ones on any process.
    reduce : callable, optional
        Sums a list of tensors over processes (distributed runs).

    Returns
    -------
    errors : dict of str to float
        ``Σ_x ‖J δ(x)‖² / Σ_x ‖f(x)‖²`` for each key, estimated as above.
    layer_errors : dict of str to float
        ``Σ ‖δ‖² / Σ ‖reference‖²`` for each key, exactly, over its perturbations that
        give a reference, on the same images: the layer error that the output error
        goes with.
    images : int
        Images behind the estimates (over every process).
    """
    keys = list(perturbations)
    by_module: dict[str, list[tuple[int, Delta]]] = {}
    for i, key in enumerate(keys):
        for name, delta in perturbations[key]:
            by_module.setdefault(name, []).append((i, delta))
    dots: list[Tensor] = []  # per key, this chunk's ⟨Jᵀv, δ⟩ per image (B,)
    layer = torch.zeros(len(keys), 2, dtype=torch.float64)  # per key: Σ‖δ‖², Σ‖reference‖²

    def hook(name: str):
        def fn(_mod, inp, out):
            rest = ()
            if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
                out, rest = out[0], out[1:]  # an attention layer's (output, weights)
            if not isinstance(out, Tensor):
                return None
            x, y = inp[0].detach(), out.detach()
            for i, delta in by_module[name]:
                with torch.no_grad():
                    d, ref = delta(x, y)
                    if ref is not None:
                        layer[i, 0] += float(d.double().square().sum())
                        layer[i, 1] += float(ref.double().square().sum())
                out = _Tap.apply(out, d, dots[i])
            return (out, *rest) if rest else out

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in by_module]
    err = torch.zeros(len(keys), dtype=torch.float64)
    out_sq = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    offsets = list(offsets) if offsets is not None else _consecutive(batches)
    try:
        with torch.enable_grad():
            for batch, off in zip(batches, offsets, strict=True):
                take = min(batch.shape[0], max(images - off, 0))
                for start in range(0, take, CHUNK):
                    x = batch[start : min(start + CHUNK, take)].detach().requires_grad_(True)
                    dots[:] = [torch.zeros(x.shape[0], dtype=torch.float64) for _ in keys]
                    out = flatten(model(x))  # (b, m)
                    v = _signs(off + start, out.shape, seed).to(out.device, out.dtype)
                    if out.requires_grad:  # else the output does not depend on the input
                        torch.autograd.grad((out * v).sum(), x, allow_unused=True)  # taps add
                    err += torch.stack([d.square().sum() for d in dots]) if keys else 0.0
                    out_sq += out.detach().double().square().sum().cpu()
                    count += out.shape[0]
    finally:
        for h in handles:
            h.remove()
    sums = [err, out_sq, count, layer]
    if reduce is not None:
        sums = [t.cpu() for t in reduce(sums)]
    err, out_sq, count, layer = sums
    rel = (err / out_sq).tolist() if float(out_sq) > 0 else [0.0] * len(keys)
    own = torch.where(layer[:, 1] > 0, layer[:, 0] / layer[:, 1].clamp_min(1e-300), 0.0)
    return dict(zip(keys, rel, strict=True)), dict(zip(keys, own.tolist(), strict=True)), int(count)


def _consecutive(batches: Sequence[Tensor]) -> list[int]:
    offsets, at = [], 0
    for b in batches:
        offsets.append(at)
        at += b.shape[0]
    return offsets


def _signs(first: int, shape: torch.Size, seed: int) -> Tensor:
    """±1 of ``shape`` (b, m), row ``i`` from image ``first + i``'s own generator."""
    rows = [
        torch.randint(
            0, 2, (shape[1],), generator=torch.Generator().manual_seed(_mix(seed, first + i))
        )
        for i in range(shape[0])
    ]
    return torch.stack(rows).double() * 2 - 1


def _mix(seed: int, image: int) -> int:
    return (seed * 1_000_003 + image * 7_919 + 1) % (2**63 - 1)
