"""Accuracy of a CIFAR-style ResNet-20 trained on scikit-learn's digits, pruned by every
method with sampler layers on and off, and with the block-sum target on and off.
Writes a Markdown table (stdout, and --out if given).

    python scripts/resnet_table.py --out docs/resnet.md
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

import recon
from recon._default import train
from recon.budget import count_flops
from recon.data import evaluate, load_digits_split
from recon.models import digits_resnet20
from recon.select import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--calib", type=int, default=500, help="calibration images (500)")
    parser.add_argument("--speedups", default="2,3,4")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # under-determined fits are reported below

    x_train, y_train, x_test, y_test = load_digits_split(seed=args.seed)
    torch.manual_seed(args.seed)
    model = digits_resnet20()
    t0 = time.perf_counter()
    train(
        model,
        x_train,
        y_train,
        epochs=args.epochs,
        lr=0.1,
        batch_size=64,
        seed=args.seed,
        progress=False,
    )
    model.eval()
    t_train = time.perf_counter() - t0
    flops, _ = count_flops(model, x_test[:1])
    calib = x_train[: args.calib].split(100)
    base = evaluate(model, x_test, y_test)
    speedups = [float(s) for s in args.speedups.split(",")]

    with torch.no_grad():
        ref = model(x_test).double()

    def run(**kwargs) -> tuple[list[str], float]:
        cells, t = [], time.perf_counter()
        for s in speedups:
            res = recon.prune(
                model,
                calib,
                speedup=s,
                allocation="uniform",
                seed=args.seed,
                progress=False,
                **kwargs,
            )
            acc = evaluate(res.model, x_test, y_test)
            with torch.no_grad():
                err = float(((res.model(x_test).double() - ref) ** 2).sum() / (ref**2).sum())
            cells.append(f"{100 * acc:.2f}% · {err:.3f} · {res.report.speedup:.2f}×")
        return cells, time.perf_counter() - t

    head = "| " + " | ".join(f"{s:g}×: acc · err · FLOPs ratio" for s in speedups) + " |"
    rule = "---|" * len(speedups)
    lines = [
        "# A ResNet-20 on scikit-learn's digits: sampler layers and the block target",
        "",
        f"Digits ResNet-20 (`recon.models.digits_resnet20`: 3 stages of 16/32/64 channels, "
        f"BasicBlocks, 1×1 conv + BN projection shortcuts; {flops / 1e6:.2f} MFLOPs per 8×8 "
        f"image), trained {args.epochs} epochs on the {len(y_train)}-image train split of "
        f"scikit-learn's digits in {t_train:.0f} s. {args.calib} calibration images from the "
        f"train split, accuracy on the {len(y_test)}-image test split, no fine-tuning. "
        f"Original: {100 * base:.2f}%.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Command: `python scripts/resnet_table.py`.",
        "",
        "Each cell: test accuracy · relative error of the logits on the test split "
        "(‖z' − z‖² / ‖z‖²) · measured FLOPs ratio original/pruned.",
        "",
        "Every method, re-fitting by least squares, sampler layers on and off:",
        "",
        "| method | sampler layers " + head + " time (s) |",
        "|---|---|" + rule + "---:|",
    ]
    for method in METHODS:
        for samplers in (True, False):
            cells, t = run(method=method, sampler_layers=samplers)
            on = "on" if samplers else "off"
            lines.append(f"| {method} | {on} | " + " | ".join(cells) + f" | {t:.1f} |")
            print(lines[-1], flush=True)
    lines += [
        "",
        "LASSO, sampler layers on: the block-sum target (the last conv of each branch "
        "re-fitted against branch + shortcut) against the branch alone, and no re-fitting:",
        "",
        "| target | reconstruct " + head + " time (s) |",
        "|---|---|" + rule + "---:|",
    ]
    for name, kwargs in (
        ("block sum", {"block_target": True}),
        ("branch only", {"block_target": False}),
        ("-", {"reconstruct": "none"}),
    ):
        cells, t = run(method="lasso", **kwargs)
        rec = kwargs.get("reconstruct", "lstsq")
        lines.append(f"| {name} | {rec} | " + " | ".join(cells) + f" | {t:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
