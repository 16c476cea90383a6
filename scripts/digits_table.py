"""Accuracy of the embedded digits VGG pruned 2x and 4x by every method, with and
without reconstruction. Writes a Markdown table (stdout, and --out if given).

    python scripts/digits_table.py --out docs/digits.md
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import recon
from recon._default import default_model
from recon.data import evaluate, load_digits_split
from recon.select import METHODS
from recon.solve import RECONSTRUCT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--calib", type=int, default=500, help="calibration images (500)")
    parser.add_argument("--speedups", default="2,4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = default_model(progress=False)
    x_train, _, x_test, y_test = load_digits_split()
    calib = x_train[: args.calib].split(64)
    base = evaluate(model, x_test, y_test)
    speedups = [float(s) for s in args.speedups.split(",")]
    lines = [
        "# A VGG on scikit-learn's digits: every method at 2× and 4×",
        "",
        f"Digits VGG (`recon.models.digits_vgg`, trained by `recon._default.default_model`), "
        f"{args.calib} calibration images from the train split, accuracy on the "
        f"{len(y_test)}-image test split, no fine-tuning. Original: {100 * base:.2f}%.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Command: `python scripts/digits_table.py`.",
        "",
        "| method | reconstruct | " + " | ".join(f"{s:g}× acc" for s in speedups) + " | time (s) |",
        "|---|---|" + "---:|" * (len(speedups) + 1),
    ]
    for method in METHODS:
        for rec in RECONSTRUCT:
            accs, t0 = [], time.perf_counter()
            for s in speedups:
                res = recon.prune(
                    model,
                    calib,
                    method=method,
                    reconstruct=rec,
                    speedup=s,
                    allocation="uniform",
                    seed=args.seed,
                    progress=False,
                )
                accs.append(evaluate(res.model, x_test, y_test))
            cells = " | ".join(f"{100 * a:.2f}%" for a in accs)
            lines.append(f"| {method} | {rec} | {cells} | {time.perf_counter() - t0:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
