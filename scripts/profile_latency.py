"""Where the CPU time of a model goes, original and pruned, by operator.

Explains why the measured latency speed-up trails the FLOPs ratio (docs/benchmarks.md,
section 3; docs/benchmarks_224.md): FLOPs count convolutions only, while max-pooling,
BatchNorm, residual additions and sampler layers' index-selects cost time too, and
convolutions with channel counts that are not multiples of 8 run below the kernel's
best speed (``round_to=8`` helps).

    python scripts/profile_latency.py              # shipped VGG-16, batch 64, 10 repeats
    python scripts/profile_latency.py --model torchvision:resnet50 --size 224 --batch 1
    python scripts/profile_latency.py --model torchvision:resnet50 --batch 8 --channels-last

A torchvision model (random weights, BatchNorm statistics re-estimated as in
``scripts/bench.py scale224``) is pruned at ``--prune-size`` px from 16 random images
(uniform split: the shapes matter here, not the weights) and timed at ``--size``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import GROUPS, by_operator

import recon
from recon.data import load_embedded
from recon.models import pretrained


def main(argv: list[str] | None = None) -> list[tuple[str, float, dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (64)")
    p.add_argument("--repeats", type=int, default=10, help="profiled passes (10)")
    p.add_argument(
        "--model",
        default="vgg16_fmnist",
        help="the shipped vgg16_fmnist, or torchvision:NAME (random weights) (vgg16_fmnist)",
    )
    p.add_argument("--size", type=int, default=224, help="torchvision: timed input px (224)")
    p.add_argument(
        "--prune-size", type=int, default=64, help="torchvision: px of the pruning images (64)"
    )
    p.add_argument("--speedups", default="2,4", help="FLOPs targets (2,4)")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="time the models and the input in the channels_last memory format",
    )
    args = p.parse_args(argv)
    if args.model == "vgg16_fmnist":
        x_calib = load_embedded()[0]
        net = pretrained("vgg16_fmnist").eval()
        x = x_calib[: args.batch]
    else:
        import _bench224  # the 224-px benchmark's seeded model and images

        net, x_calib = _bench224.build(args.model, 16, args.prune_size)
        x_calib = x_calib.split(8)
        x = _bench224.images(net, args.batch, args.size)
    runs = [("original", net, 1.0)]
    for speedup in (float(v) for v in args.speedups.split(",")):
        for round_to in (1, 8):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # few images for wide layers
                res = recon.prune(
                    net,
                    x_calib,
                    speedup=speedup,
                    allocation="uniform",
                    round_to=round_to,
                    samples_per_image=2 if args.model != "vgg16_fmnist" else 10,
                    progress=False,
                )
            name = f"{speedup:g}x" + (f", round_to={round_to}" if round_to > 1 else "")
            runs.append((name, res.model.eval(), res.report.speedup))
    print(
        f"{args.model}: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"batch {args.batch}, input {tuple(x.shape[1:])}"
        f"{', channels_last' if args.channels_last else ''}; ms per forward pass (self CPU time) "
        "and, in brackets, the original's time over the pruned model's"
    )
    print("| model | FLOPs ratio | total ms | speed-up | " + " | ".join(GROUPS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(GROUPS))
    base: dict[str, float] = {}
    rows = []
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    for name, model, flops_ratio in runs:
        ms = by_operator(model.to(memory_format=fmt), x, args.repeats)
        total = sum(ms.values())
        rows.append((name, total, dict(ms)))
        base = base or {**ms, "total": total}
        cells = [
            f"{ms[g]:.2f} ({base[g] / ms[g]:.2f}x)" if ms[g] and base.get(g) else f"{ms[g]:.2f}"
            for g in GROUPS
        ]
        print(
            f"| {name} | {flops_ratio:.2f} | {total:.2f} | {base['total'] / total:.2f}x | "
            + " | ".join(cells)
            + " |"
        )
    return rows


if __name__ == "__main__":
    main()
