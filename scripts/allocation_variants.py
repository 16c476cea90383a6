"""How far can a different split of the FLOPs target take one-shot accuracy? A bound.

``allocation="auto"`` minimises ``Σ_u s_u · e_u(k_u)`` (sensitivity × layer error, see
``recon.profile``) under the FLOPs target. This script profiles a shipped model once,
through ``recon.prune``'s own call, then re-allocates with other shapes of the cost
and prunes with each split as explicit ``channels=`` (same method, re-fit, images
and seed), measuring top-1 on the test split:

- ``auto``: the cost as recon uses it;
- ``alpha=0.5``: ``√s_u · e_u`` (sensitivities flattened);
- ``layer only``: ``e_u`` (no sensitivity: every layer's relative error counts alike);
- ``rho=r``: ``r^(units after u) · s_u · e_u`` — with ``r < 1`` early units are cheaper,
  as if each later re-fit removed a share ``1 − r`` of the error arriving at it
  (the sequential pipeline's compensation, which the single-unit probes do not see);
  ``r > 1``: the opposite, errors that grow on their way to the output;
- ``uniform``: the same keep ratio everywhere.

If none of these moves the accuracy much, the split is not what bounds the one-shot
loss at that target: the per-layer selection and re-fit are.

    python scripts/allocation_variants.py                   # VGG-16 and ResNet-20 at 4x, lasso
    python scripts/allocation_variants.py --models vgg16_fmnist --speedups 2,4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args

import recon
import recon.api as _api
from recon.allocate import allocate
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.models import pretrained

VARIANTS = {
    "auto": lambda i, n, p: p.cost,
    "alpha=0.5": lambda i, n, p: p.sensitivity**0.5 * p.layer_error,
    "layer only": lambda i, n, p: p.layer_error,
    "rho=0.9": lambda i, n, p: p.cost * 0.9 ** (n - 1 - i),
    "rho=0.8": lambda i, n, p: p.cost * 0.8 ** (n - 1 - i),
    "rho=1.1": lambda i, n, p: p.cost * 1.1 ** (n - 1 - i),
}


@contextlib.contextmanager
def _captured():
    """What ``recon.prune(..., allocation="auto")`` profiles and allocates with."""
    box: dict = {}
    profile_units, allocate_ = _api.profile_units, _api.allocate

    def profile(*args, **kwargs):
        box["profile"] = profile_units(*args, **kwargs)
        return box["profile"]

    def alloc(units, curves, **kwargs):
        box["units"], box["kwargs"] = units, kwargs
        return allocate_(units, curves, **kwargs)

    _api.profile_units, _api.allocate = profile, alloc
    try:
        yield box
    finally:
        _api.profile_units, _api.allocate = profile_units, allocate_


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="vgg16_fmnist,resnet20_fmnist")
    p.add_argument("--speedups", type=_args.ratios("FLOPs ratios", "4"), default=(4.0,))
    p.add_argument("--method", default="lasso")
    p.add_argument("--reconstruct", default="lstsq")
    p.add_argument("--calib", type=_args.int_at_least(1), default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/allocation_variants.md"))
    args = p.parse_args(argv)

    warnings.simplefilter("ignore")  # under-determined re-fits warn; the losses are the point
    x_raw, _ = load_fashion_mnist("train")
    xt_raw, yt_raw = load_fashion_mnist("test")
    x, x_test = to_tensor32(x_raw), to_tensor32(xt_raw)
    y_test = torch.from_numpy(yt_raw)
    g = torch.Generator().manual_seed(args.seed)
    calib = x[torch.randperm(len(x), generator=g)[: args.calib]].split(100)
    common = dict(method=args.method, reconstruct=args.reconstruct, seed=args.seed)
    rows, t0 = [], time.perf_counter()
    for name in args.models.split(","):
        net = pretrained(name)
        base = evaluate(net, x_test, y_test)
        for s in args.speedups:
            with _captured() as box:
                recon.prune(net, calib, speedup=s, allocation="auto", progress=False, **common)
            units = box["profile"].units
            splits = {}
            for label, cost in VARIANTS.items():
                curves = {
                    u: (q.counts, cost(i, len(units), q)) for i, (u, q) in enumerate(units.items())
                }
                splits[label] = allocate(box["units"], curves, **box["kwargs"]).channels
            splits["uniform"] = None
            for label, channels in splits.items():
                how = (
                    {"channels": channels}
                    if channels
                    else {"speedup": s, "allocation": "uniform"}  # (the default is auto)
                )
                res = recon.prune(net, calib, progress=False, **how, **common)
                row = {
                    "model": name,
                    "target": s,
                    "variant": label,
                    "speedup": res.report.speedup,
                    "loss": 100 * (base - evaluate(res.model, x_test, y_test)),
                    "output_error": res.report.output_error,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        "# Allocation variants: how much the split of the FLOPs target moves one-shot accuracy",
        "",
        f"Generated by `python scripts/allocation_variants.py {shlex.join(argv or sys.argv[1:])}`"
        f" ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__},"
        f" {time.perf_counter() - t0:.0f} s). Shipped models, {args.calib} calibration images "
        f"(seed {args.seed}, train split), `method={args.method!r}`, "
        f"`reconstruct={args.reconstruct!r}`, no fine-tuning; loss = top-1 points lost on the "
        "10,000 test images; logit error = relative error of the logits on the calibration "
        "images. The variants are defined in the script's docstring.",
        "",
        "| model | target | variant | speed-up | loss (points) | logit error |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']:g}× | {r['variant']} | {r['speedup']:.2f} | "
            f"{r['loss']:.2f} | {r['output_error']:.4f} |"
        )
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
