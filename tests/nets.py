"""Helpers shared by the tests that build networks or the small data they learn."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import recon


def quiet_prune(model: nn.Module, calib, **kwargs) -> recon.PruneResult:
    """``recon.prune`` without a progress bar or the 'under-determined' warning of tiny
    calibration sets."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="re-fitting", category=UserWarning)
        return recon.prune(model, calib, progress=False, **kwargs)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖² / ‖b‖²`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b) ** 2).sum() / (b**2).sum())


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorms with non-trivial statistics, so that their scale and shift matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def bright_pixels(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 8x8 one-channel problem: noise plus one bright pixel per class."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[torch.arange(n), 0, y % 8, y // 8 + 2] += 3.0  # one bright pixel per class
    return x, y
