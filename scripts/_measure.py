"""What the measurement scripts compare between an original and a pruned model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def logit_error(a: nn.Module, b: nn.Module, x: Tensor, batch_size: int = 500) -> float:
    """Relative squared error of b's logits against a's: ``Σ‖b(x)−a(x)‖² / Σ‖a(x)‖²``."""
    num = den = 0.0
    with torch.inference_mode():
        for xb in x.split(batch_size):
            ya, yb = a(xb).double(), b(xb).double()
            num += float(((yb - ya) ** 2).sum())
            den += float((ya**2).sum())
    return num / den


def reestimate_bn(net: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """``net`` in eval mode, its BatchNorm statistics the plain average over ``batches``
    (random-weight models then have activations of realistic scale)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
    net.train()
    with torch.no_grad():
        for xb in batches:
            net(xb)
    return net.eval()
