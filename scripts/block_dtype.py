"""float32 block products against the float64 statistics on the shipped models.

    python scripts/block_dtype.py                                  # obs, auto, 2x and 4x
    python scripts/block_dtype.py --models vgg16_fmnist --method lasso --allocation uniform

Prunes each model twice, ``block_dtype="float64"`` (the default) and ``"float32"``, from
the same 1,000 calibration images (reproduce.py's draw) and prints, per target: whether
the same channels were kept, the top-1 accuracy of each on the 10,000 test images, and
the seconds of the statistics phase and of the whole run (timings on a shared machine
are noisy; the accuracy and channels are what this compares).
"""

from __future__ import annotations

import argparse
import warnings

import torch

import recon
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.models import pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="vgg16_fmnist,resnet20_fmnist", help="shipped models")
    p.add_argument("--method", default="obs", help="selection method (obs)")
    p.add_argument("--allocation", default="auto", help="allocation (auto)")
    p.add_argument("--speedups", default="2,4", help="FLOPs targets (2,4)")
    p.add_argument("--calib", type=int, default=1000, help="calibration images (1000)")
    args = p.parse_args()

    x_train, _ = load_fashion_mnist("train")
    x = to_tensor32(x_train)
    g = torch.Generator().manual_seed(0)
    calib = x[torch.randperm(len(x), generator=g)[: args.calib]].split(100)
    xt, yt = load_fashion_mnist("test")
    x_test, y_test = to_tensor32(xt), torch.from_numpy(yt)
    print(
        f"{args.method}, {args.allocation}, {args.calib} calibration images, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'model':<16} {'target':>6}  {'same channels':>13}  {'top-1 f64':>9} {'top-1 f32':>9}  "
          f"{'stats s f64 / f32':>17}  {'total s f64 / f32':>17}")  # fmt: skip
    for name in args.models.split(","):
        net = pretrained(name)
        for s in (float(v) for v in args.speedups.split(",")):
            res = {}
            for dtype in ("float64", "float32"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res[dtype] = recon.prune(
                        net, calib, method=args.method, allocation=args.allocation, speedup=s,
                        block_dtype=dtype, progress=False,
                    )  # fmt: skip
            a, b = res["float64"], res["float32"]
            acc = [evaluate(r.model, x_test, y_test) for r in (a, b)]
            stats = [r.report.phases.get("stats", 0.0) for r in (a, b)]
            total = [sum(r.report.phases.values()) for r in (a, b)]
            print(
                f"{name:<16} {s:>5g}x  {a.kept == b.kept!s:>13}  {100 * acc[0]:8.2f}% "
                f"{100 * acc[1]:8.2f}%  {stats[0]:8.2f} / {stats[1]:<6.2f}  "
                f"{total[0]:8.2f} / {total[1]:<6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
