"""What the measurement scripts compare between an original and a pruned model: logits,
BatchNorm statistics, and where the CPU time goes by operator."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile


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
    (random-weight models then have activations of realistic scale).

    Each BatchNorm's ``momentum`` is set back afterwards: left at ``None`` (a
    cumulative average), later training would average the running statistics over
    all of its steps, and the trained model would be evaluated with stale ones."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    net.train()
    try:
        with torch.no_grad():
            for xb in batches:
                net(xb)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return net.eval()


OPS = {
    "aten::mkldnn_convolution": "conv",
    "aten::convolution": "conv",
    "aten::_slow_conv2d_forward": "conv",  # CPU 1x1 convolutions: im2col-free GEMM
    "aten::max_pool2d_with_indices": "max-pool",
    "aten::max_pool2d": "max-pool",
    "aten::native_batch_norm": "batch-norm",
    "aten::relu_": "relu",
    "aten::clamp_min_": "relu",
    "aten::index_select": "index-select",
    "aten::index_copy": "index-select",  # a 1x1 SampledConv2d's weight on channels_last
    "aten::add_": "add",
    "aten::add": "add",
    "aten::adaptive_avg_pool2d": "avg-pool",
    "aten::mean": "avg-pool",
    "aten::addmm": "linear",
    "aten::copy_": "copy",
    "aten::clone": "copy",
}
GROUPS = ("conv", "max-pool", "batch-norm", "relu", "add", "index-select", "copy", "other")


def by_operator(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Milliseconds per forward pass, by operator group (self CPU time)."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(x)
    ms: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        ms[OPS.get(event.key, "other")] += event.self_cpu_time_total / repeats / 1000
    return ms
