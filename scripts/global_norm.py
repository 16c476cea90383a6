"""Raw vs normalised scores in one global ranking (``allocation="global"`` vs
``"global_normalized"``) on a shipped model, beside the uniform split; and the global
ranking's floor (``min_keep``).

    python scripts/global_norm.py                     # l1 and bn_gamma, 2x, 128 images
    python scripts/global_norm.py --methods l1,apoz --speedup 3 --calib 256
    python scripts/global_norm.py --min-keep 0      # the global rankings without a floor
    python scripts/global_norm.py --model vgg16_fmnist_bnl1 --methods bn_gamma \\
        --reconstruct lstsq --allocations global --min-keep 0,0.1,0.2,0.25,0.3,0.4 \\
        --calib 1000 --n-test 10000               # the floor, swept

Prunes without re-fitting by default (``reconstruct="none"``, so that only the channel
counts differ) and prints the top-1 accuracy on a seeded subset of the test split and
the channels kept per layer. No fine-tuning: this compares where the ranking cuts.
"""

from __future__ import annotations

import argparse
import time

import torch

import recon
from recon.api import GLOBAL_ALLOCATIONS
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.models import pretrained
from recon.ranking import MIN_KEEP


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="vgg16_fmnist", help="shipped model (vgg16_fmnist)")
    p.add_argument("--methods", default="l1,bn_gamma", help="score methods (l1,bn_gamma)")
    p.add_argument(
        "--allocations",
        default="uniform,global,global_normalized",
        help="allocations compared (uniform,global,global_normalized)",
    )
    p.add_argument("--speedup", type=float, default=2.0, help="FLOPs target (2)")
    p.add_argument("--calib", type=int, default=128, help="calibration images (128)")
    p.add_argument("--n-test", type=int, default=1000, help="test images (1000)")
    p.add_argument("--reconstruct", default="none", help="re-fit (none)")
    p.add_argument(
        "--min-keep",
        default=str(MIN_KEEP),
        help="the global rankings' floors, comma-separated "
        f"(recon.prune's min_keep=; {MIN_KEEP:g})",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    floors = [float(f) for f in args.min_keep.split(",")]

    g = torch.Generator().manual_seed(args.seed)
    x_raw, _ = load_fashion_mnist("train")
    xt_raw, yt_raw = load_fashion_mnist("test")
    x = to_tensor32(x_raw)
    calib = x[torch.randperm(len(x), generator=g)[: args.calib]]
    test = torch.randperm(len(xt_raw), generator=g)[: args.n_test]
    x_test = to_tensor32(xt_raw)[test]
    y_test = torch.as_tensor(yt_raw, dtype=torch.long)[test]
    net = pretrained(args.model)
    print(
        f"{args.model}, {args.calib} calibration images, {len(test)} test images, "
        f"reconstruct={args.reconstruct}, target {args.speedup:g}x"
    )
    print(f"unpruned: {100 * evaluate(net, x_test, y_test):.2f}%")
    print(
        f"{'method':<10} {'allocation':<18} {'min_keep':>8} {'speedup':>7} {'top-1':>7} "
        f"{'s':>5}  channels"
    )
    for method in args.methods.split(","):
        for allocation in args.allocations.split(","):
            for floor in floors if allocation in GLOBAL_ALLOCATIONS else [None]:
                t0 = time.perf_counter()
                res = recon.prune(
                    net, calib.split(64), method=method, speedup=args.speedup,
                    allocation=allocation, reconstruct=args.reconstruct, seed=args.seed,
                    min_keep=MIN_KEEP if floor is None else floor,
                    # a residual block's input has no BatchNorm of its own
                    sampler_layers=method != "bn_gamma", progress=False,
                )  # fmt: skip
                acc = evaluate(res.model, x_test, y_test)
                shown = "" if floor is None else f"{floor:g}"
                print(
                    f"{method:<10} {allocation:<18} {shown:>8} {res.report.speedup:7.2f} "
                    f"{100 * acc:6.2f}% {time.perf_counter() - t0:5.0f}  "
                    f"{list(res.channels.values())}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
