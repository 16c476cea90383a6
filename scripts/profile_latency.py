"""Where the CPU time of the shipped VGG-16 goes, original and pruned, by operator.

Explains why the measured latency speed-up trails the FLOPs ratio (docs/benchmarks.md,
section 3): FLOPs count convolutions only, while max-pooling and BatchNorm cost time
too, and convolutions with channel counts that are not multiples of 8 run below the
kernel's best speed (``round_to=8`` helps).

    python scripts/profile_latency.py              # batch 64, 10 repeats
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import recon
from recon.data import load_embedded
from recon.models import pretrained

OPS = {
    "aten::mkldnn_convolution": "conv",
    "aten::convolution": "conv",
    "aten::max_pool2d_with_indices": "max-pool",
    "aten::max_pool2d": "max-pool",
    "aten::native_batch_norm": "batch-norm",
    "aten::relu_": "relu",
    "aten::clamp_min_": "relu",
}


def _profile(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
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


def main(argv: list[str] | None = None) -> list[tuple[str, float, dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (64)")
    p.add_argument("--repeats", type=int, default=10, help="profiled passes (10)")
    args = p.parse_args(argv)
    x_calib = load_embedded()[0]
    net = pretrained("vgg16_fmnist").eval()
    runs = [("original", net, 1.0)]
    for speedup in (2.0, 4.0):
        for round_to in (1, 8):
            res = recon.prune(
                net,
                x_calib,
                speedup=speedup,
                allocation="uniform",
                round_to=round_to,
                progress=False,
            )
            name = f"{speedup:g}x" + (f", round_to={round_to}" if round_to > 1 else "")
            runs.append((name, res.model.eval(), res.report.speedup))
    x = x_calib[: args.batch]
    groups = ("conv", "max-pool", "batch-norm", "relu", "other")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}")
    print("| model | FLOPs ratio | total ms | speed-up | " + " | ".join(groups) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(groups))
    base: dict[str, float] = {}
    rows = []
    for name, model, flops_ratio in runs:
        ms = _profile(model, x, args.repeats)
        total = sum(ms.values())
        rows.append((name, total, dict(ms)))
        base = base or {**ms, "total": total}
        cells = [f"{ms[g]:.2f} ({base[g] / ms[g]:.2f}x)" if ms[g] else "0" for g in groups]
        print(
            f"| {name} | {flops_ratio:.2f} | {total:.2f} | {base['total'] / total:.2f}x | "
            + " | ".join(cells)
            + " |"
        )
    return rows


if __name__ == "__main__":
    main()
