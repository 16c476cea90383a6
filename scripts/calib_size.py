"""How many calibration images does recon need? Top-1 by calibration size and re-fit.

Prunes the shipped models (``vgg16_fmnist``, ``resnet20_fmnist``) with recon's defaults
(``method="obs"``, ``allocation="auto"``) at 2x FLOPs, without fine-tuning, from 32,
128 and 1,000 calibration images drawn (seeded) from the Fashion-MNIST train split,
with every re-fit, and once more with the default re-fit and the uniform split (the
*uniform* column: what auto's allocation gains or loses at each size):

- ``lstsq``: the default, least squares with a ridge towards ThiNet's scale fit (or
  the original weights), its strength chosen per layer by 4-fold cross-validation;
- ``lstsq_plain``: plain least squares (recon before the cross-validated re-fit);
- ``scale``: ThiNet's per-channel scaling;
- ``none``: no re-fit.

Reports top-1 on the 10,000 test images and the relative logit error
``Σ‖pruned − original‖² / Σ‖original‖²`` on the calibration images and on 2,000
held-out test images, and the pruning time. Writes ``<out-dir>/calib_size.md`` and
``<out-dir>/calib_size.jsonl``.

    python scripts/calib_size.py                       # docs/ (about 20 min, 2 cores)
    python scripts/calib_size.py --quick --out-dir /tmp/c    # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import recon
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.models import pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import logit_error

MODELS = ("vgg16_fmnist", "resnet20_fmnist")
MODES = ("lstsq", "lstsq_plain", "scale", "none")


def _run(
    model: str,
    mode: str,
    calib: Tensor,
    test: tuple[Tensor, Tensor],
    held: Tensor,
    speedup: float,
    *,
    method: str = "obs",
    allocation: str = "auto",
) -> dict[str, Any]:
    original = pretrained(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the under-determined warnings are the point here
        t0 = time.perf_counter()
        res = recon.prune(
            pretrained(model),
            calib.split(100),
            speedup=speedup,
            method=method,
            reconstruct=mode,
            allocation=allocation,
            progress=False,
        )
        seconds = time.perf_counter() - t0
    ridges = [layer.ridge for layer in res.report.layers]
    return {
        "model": model,
        "images": len(calib),
        "reconstruct": mode,
        "method": method,
        "allocation": allocation,
        "speedup": res.report.speedup,
        "acc": evaluate(res.model, *test),
        "calib_err": logit_error(original, res.model, calib[:2000]),
        "heldout_err": logit_error(original, res.model, held),
        "seconds": seconds,
        "ridges": [r if r == r and r != float("inf") else str(r) for r in ridges],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--out-dir", type=Path, default=Path("docs"), help="output folder (docs/)")
    p.add_argument("--seed", type=int, default=0, help="calibration draw seed (0)")
    p.add_argument("--speedup", type=float, default=2.0, help="FLOPs target (2)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 128, 1000])
    p.add_argument("--method", default="obs", choices=recon.select.METHODS, help="(obs)")
    p.add_argument(
        "--allocation", default="auto", choices=("auto", "uniform"), help="(auto, the default)"
    )
    p.add_argument(
        "--no-uniform", action="store_true", help="leave out the uniform column (lstsq, uniform)"
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 300 test images")
    args = p.parse_args(argv)

    x_train = to_tensor32(load_fashion_mnist("train")[0])  # (60000, 1, 32, 32)
    images, labels = load_fashion_mnist("test")
    test = to_tensor32(images), torch.from_numpy(labels)
    if args.quick:
        test = test[0][:300], test[1][:300]
    held = test[0][:2000]
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = args.out_dir / "calib_size.jsonl"
    uniform = args.allocation != "uniform" and not args.no_uniform and "lstsq" in args.modes
    columns = [*args.modes, *(["uniform"] if uniform else [])]
    t_all = time.perf_counter()
    rows, base = [], {}
    with jsonl.open("w") as fh:
        for model in args.models:
            base[model] = evaluate(pretrained(model), *test)
            print(f"{model}: {base[model]:.2%} on {len(test[1])} test images", flush=True)
            for n in args.sizes:
                for col in columns:
                    mode, allocation = _column(col, args.allocation)
                    row = _run(model, mode, x_train[order[:n]], test, held, args.speedup,
                               method=args.method, allocation=allocation)  # fmt: skip
                    row["base"] = base[model]
                    row["column"] = col
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    print(
                        f"  {n:5d} images {col:12s} acc {row['acc']:.2%}  logit err calib "
                        f"{row['calib_err']:.4f} held out {row['heldout_err']:.4f}  "
                        f"{row['seconds']:.0f} s",
                        flush=True,
                    )
    minutes = (time.perf_counter() - t_all) / 60
    cmd = "python scripts/calib_size.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    lines = [
        "# How many calibration images: top-1 by calibration size and re-fit",
        "",
        f"Generated by `{cmd}` in {minutes:.0f} min on {platform.machine()} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}). "
        f"`method={args.method!r}`, `allocation={args.allocation!r}` at {args.speedup:g}x FLOPs"
        + (
            ", and in the *uniform* column `reconstruct='lstsq'` with `allocation='uniform'`"
            if uniform
            else ""
        )
        + ", no fine-tuning, calibration images drawn (seed "
        f"{args.seed}) from the Fashion-MNIST train split, top-1 on {len(test[1]):,} test "
        "images (in brackets: points against the unpruned model). *Logit error*: "
        "`Σ‖pruned − original‖² / Σ‖original‖²` on the calibration images and on "
        f"{len(held):,} held-out test images.",
        "",
    ]

    def table(model: str, cell, gain: bool = False) -> list[str]:  # a row per size
        more = ["auto − uniform"] if gain and uniform else []
        head = ["| images | " + " | ".join([*columns, *more]) + " |"]
        head.append("|---|" + "---|" * (len(columns) + len(more)))
        found = {(r["images"], r["column"]): r for r in rows if r["model"] == model}
        out = []
        for n in args.sizes:
            cells = [cell(found[(n, col)]) for col in columns]
            if more:
                diff = found[(n, "lstsq")]["acc"] - found[(n, "uniform")]["acc"]
                cells.append(f"{100 * diff:+.2f}")
            out.append(f"| {n:,} | " + " | ".join(cells) + " |")
        return head + out

    for model in args.models:
        lines += [f"## {model} ({base[model]:.2%})", ""]
        lines += table(
            model, lambda r: f"{r['acc']:.2%} ({100 * (r['acc'] - r['base']):+.2f})", gain=True
        )
        lines += ["", "Logit error on the calibration images / held out, and pruning time:", ""]
        lines += table(
            model,
            lambda r: f"{r['calib_err']:.4f} / {r['heldout_err']:.4f}, {r['seconds']:.0f} s",
        )
        lines.append("")
    out = args.out_dir / "calib_size.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def _column(col: str, allocation: str) -> tuple[str, str]:
    """A column's re-fit and allocation: ``"uniform"`` is the default re-fit, uniform."""
    return ("lstsq", "uniform") if col == "uniform" else (col, allocation)


if __name__ == "__main__":
    main()
