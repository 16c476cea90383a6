"""Short supervised fine-tuning after pruning, and the training loop behind it.

recon itself needs no labels; the reproduction runs fine-tune a pruned network for a
few hundred SGD steps on labeled data to show how much of the remaining gap a short
fine-tune closes. :func:`finetune` is that loop: SGD with momentum and weight decay,
a cosine learning rate over all steps, seeded mini-batches and optional light
augmentation (random shifts and horizontal flips). ``scripts/train.py`` trains the
shipped baselines with the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._utils import model_device

__all__ = ["finetune"]


def _augment(x: Tensor, generator: torch.Generator, shift: int) -> Tensor:
    """Random shifts by up to ``shift`` pixels (zero fill) and horizontal flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (n, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    out = out.permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def finetune(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float = 0.01,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    augment: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place for ``steps`` SGD steps on ``(x, y)``; return it in eval mode.

    Minimises the mean cross-entropy of mini-batches drawn without replacement (a new
    seeded permutation each pass) with SGD, momentum 0.9, weight decay
    ``weight_decay``, and a learning rate following a cosine from ``lr`` to 0 over the
    ``steps`` steps.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits (batch, classes), e.g. ``PruneResult.model``.
    x : Tensor of shape (N, C, H, W)
        Training images (float); moved to the model's device batch by batch.
    y : Tensor of shape (N,)
        Integer labels.
    steps : int
        Number of SGD steps (>= 1).
    lr : float, default 0.01
        Peak learning rate (> 0).
    batch_size : int, default 128
    weight_decay : float, default 5e-4
    augment : bool, default True
        Random shifts of up to 4 pixels and horizontal flips.
    seed : int, default 0
        Seeds the batch order and the augmentation.
    progress : bool, default True
        Show a tqdm bar with the running loss.

    Returns
    -------
    nn.Module
        ``model``, trained, in eval mode.

    Examples
    --------
    >>> from recon.models import digits_vgg
    >>> net = digits_vgg(width=0.25)
    >>> x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    >>> finetune(net, x, y, steps=2, progress=False).training
    False
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"The '{name}' argument must be an int >= 1. Got {value!r} instead.")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"The 'lr' argument must be a float > 0. Got {lr!r} instead.")
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            "The 'x' argument must be a float tensor of shape (N, C, H, W). Got "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))} instead."
        )
    if not isinstance(y, Tensor) or y.shape != (len(x),) or y.is_floating_point():
        raise ValueError(
            f"The 'y' argument must be an integer tensor of shape ({len(x)},). Got "
            f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))} instead."
        )
    device = model_device(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(x), generator=generator), 0
    model.train()
    bar = tqdm(range(steps), desc="fine-tuning", disable=not progress, leave=False)
    running = None
    for _ in bar:
        if pos + batch_size > len(x):  # a new pass
            order, pos = torch.randperm(len(x), generator=generator), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        xb, yb = x[idx], y[idx]
        if augment:
            xb = _augment(xb, generator, shift=4)
        loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.4f}")
    bar.close()
    return model.eval()
