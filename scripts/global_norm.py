"""Raw vs normalised scores in one global ranking (``allocation="global"`` vs
``"global_normalized"``) on the shipped ``vgg16_fmnist``, beside the uniform split.

    python scripts/global_norm.py                     # l1 and bn_gamma, 2x, 128 images
    python scripts/global_norm.py --methods l1,apoz --speedup 3 --calib 256
    python scripts/global_norm.py --min-keep 0      # the global rankings without a floor

Prunes without re-fitting (``reconstruct="none"``, so that only the channel counts
differ) and prints the top-1 accuracy on a seeded subset of the test split and the
channels kept per layer. No fine-tuning: this compares where the ranking cuts.
"""

from __future__ import annotations

import argparse
import time

import torch

import recon
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.models import pretrained
from recon.ranking import MIN_KEEP


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="l1,bn_gamma", help="score methods (l1,bn_gamma)")
    p.add_argument("--speedup", type=float, default=2.0, help="FLOPs target (2)")
    p.add_argument("--calib", type=int, default=128, help="calibration images (128)")
    p.add_argument("--n-test", type=int, default=1000, help="test images (1000)")
    p.add_argument("--reconstruct", default="none", help="re-fit (none)")
    p.add_argument(
        "--min-keep",
        type=float,
        default=MIN_KEEP,
        help=f"the global rankings' floor, recon.prune's min_keep= ({MIN_KEEP:g})",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    x_raw, _ = load_fashion_mnist("train")
    xt_raw, yt_raw = load_fashion_mnist("test")
    x = to_tensor32(x_raw)
    calib = x[torch.randperm(len(x), generator=g)[: args.calib]]
    test = torch.randperm(len(xt_raw), generator=g)[: args.n_test]
    x_test = to_tensor32(xt_raw)[test]
    y_test = torch.as_tensor(yt_raw, dtype=torch.long)[test]
    net = pretrained("vgg16_fmnist")
    print(
        f"vgg16_fmnist, {args.calib} calibration images, {args.n_test} test images, "
        f"reconstruct={args.reconstruct}, target {args.speedup:g}x, min_keep={args.min_keep:g}"
    )
    print(f"unpruned: {100 * evaluate(net, x_test, y_test):.2f}%")
    print(f"{'method':<10} {'allocation':<18} {'speedup':>7} {'top-1':>7} {'s':>5}  channels")
    for method in args.methods.split(","):
        for allocation in ("uniform", "global", "global_normalized"):
            t0 = time.perf_counter()
            res = recon.prune(
                net, calib.split(64), method=method, speedup=args.speedup,
                allocation=allocation, reconstruct=args.reconstruct, seed=args.seed,
                min_keep=args.min_keep, progress=False,
            )  # fmt: skip
            acc = evaluate(res.model, x_test, y_test)
            print(
                f"{method:<10} {allocation:<18} {res.report.speedup:7.2f} {100 * acc:6.2f}% "
                f"{time.perf_counter() - t0:5.0f}  {list(res.channels.values())}",
                flush=True,
            )


if __name__ == "__main__":
    main()
