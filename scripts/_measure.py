"""What the measurement scripts compare between an original and a pruned model."""

from __future__ import annotations

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
