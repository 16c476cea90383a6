"""Measure ``allocation="auto"`` against ``"uniform"`` on the shipped Fashion-MNIST models.

For each model, method and speed-up, prune the pretrained model twice (uniform and
auto allocation of the FLOPs target), with calibration images drawn (seeded) from the
train split and no fine-tuning, and measure top-1 accuracy on the test split. Each run
appends one JSON line to ``<out-dir>/allocation.jsonl`` as it ends (``--resume`` skips
the runs already there); at the end ``<out-dir>/allocation.md`` gets the table.

    python scripts/allocation_table.py                       # the table in docs/ (hours on 2 cores)
    python scripts/allocation_table.py --resume              # go on after an interruption
    python scripts/allocation_table.py --quick --out-dir /tmp/alloc   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args

import recon
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.models import pretrained

MODES = ("uniform", "auto")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        type=_args.names(("vgg16_fmnist", "resnet20_fmnist"), "models"),
        default=("vgg16_fmnist", "resnet20_fmnist"),
        help="shipped models, comma-separated (default: both)",
    )
    p.add_argument(
        "--methods",
        type=_args.names(recon.select.METHODS, "methods"),
        default=("obs", "lasso", "thinet"),
        help="selection methods, comma-separated (default: obs,lasso,thinet)",
    )
    p.add_argument(
        "--speedups",
        type=_args.ratios("speed-ups", "2,4"),
        default=(2.0, 3.0, 4.0, 5.0),
        help="FLOPs targets, comma-separated (default: 2,3,4,5)",
    )
    p.add_argument(
        "--calib",
        type=_args.int_at_least(1),
        default=1000,
        help="calibration images, drawn (seeded) from the train split (default 1000)",
    )
    p.add_argument(
        "--test", type=_args.int_at_least(1), default=None, help="test images (default: all 10,000)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and of prune")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("docs"),
        help="where allocation.jsonl and allocation.md go (default docs)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in allocation.jsonl and do only the others",
    )
    p.add_argument("--quick", action="store_true", help="128 calibration and 500 test images")
    args = p.parse_args(argv)
    if args.quick:
        args.calib, args.test = 128, args.test or 500
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = args.out_dir / "allocation.jsonl"
    done = set()
    if args.resume and jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["method"], r["speedup"], r["allocation"]))
    elif jsonl.exists():
        jsonl.unlink()

    torch.manual_seed(args.seed)
    x_train = to_tensor32(load_fashion_mnist("train")[0])
    g = torch.Generator().manual_seed(args.seed)
    calib = x_train[torch.randperm(len(x_train), generator=g)[: args.calib]]
    del x_train
    images, labels = load_fashion_mnist("test")
    x_test, y_test = to_tensor32(images)[: args.test], torch.from_numpy(labels)[: args.test]

    for name in args.models:
        net = pretrained(name).eval()
        base = evaluate(net, x_test, y_test)
        for method in args.methods:
            for s in args.speedups:
                for mode in MODES:
                    if (name, method, s, mode) in done:
                        continue
                    t0 = time.perf_counter()
                    res = recon.prune(net, calib, method=method, speedup=s, allocation=mode,
                                      seed=args.seed, progress=False)  # fmt: skip
                    acc = evaluate(res.model, x_test, y_test)
                    row = {
                        "model": name, "method": method, "speedup": s, "allocation": mode,
                        "calib": args.calib, "test": len(y_test), "seed": args.seed,
                        "base": base, "acc": acc, "loss": base - acc,
                        "measured_speedup": res.report.speedup,
                        "output_error": res.report.output_error,
                        "seconds": time.perf_counter() - t0,
                        "profile_seconds": res.report.phases.get("profile", 0.0),
                        "forward_seconds": res.report.phases.get("forward", 0.0),
                        "channels": res.channels,
                    }  # fmt: skip
                    with jsonl.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    msg = f"{name} {method} {s}x {mode}: {100 * acc:.2f} % (base {100 * base:.2f})"
                    print(f"{msg}, {row['seconds']:.0f} s", flush=True)
    write_table(jsonl, args.out_dir / "allocation.md", argv)


def write_table(jsonl: Path, md: Path, argv: list[str] | None) -> None:
    """``md`` from every run in ``jsonl``: the loss table, then the counts auto chose."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    by = {(r["model"], r["method"], r["speedup"], r["allocation"]): r for r in rows}
    keys = sorted({k[:3] for k in by})
    cmd = "python scripts/allocation_table.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    first = rows[0] if rows else {"calib": 0, "test": 0, "seed": 0}
    out = [
        '# Channel allocation: `allocation="auto"` vs `"uniform"`',
        "",
        f"Generated by `{cmd.strip()}` ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}). Shipped models, {first['calib']:,} calibration images "
        f"drawn with seed {first['seed']} from the Fashion-MNIST train split, top-1 on "
        f'{first["test"]:,} test images, `reconstruct="lstsq"`, no fine-tuning. Loss = base '
        "accuracy − pruned accuracy, in points. The runs' times are in allocation.jsonl; "
        "they were made on a machine shared with other jobs, so what the profile costs is "
        "measured apart (docs/guide/allocation.md, `recon bench --allocation auto`).",
        "",
        "| model | method | speedup | uniform loss | auto loss | auto − uniform | "
        "speedup (uniform / auto) |",
        "|---|---|---|---|---|---|---|",
    ]
    pairs = [(k, by.get((*k, "uniform")), by.get((*k, "auto"))) for k in keys]
    pairs = [(k, u, a) for k, u, a in pairs if u is not None and a is not None]
    for k, u, a in pairs:
        base = f"{k[0]} ({100 * u['base']:.2f} %)"
        out.append(
            f"| {base} | {k[1]} | {k[2]:g}× | {100 * u['loss']:.2f} | {100 * a['loss']:.2f} | "
            f"{100 * (a['loss'] - u['loss']):+.2f} | {u['measured_speedup']:.2f} / "
            f"{a['measured_speedup']:.2f} |"
        )
    better = sum(a["loss"] < u["loss"] for _, u, a in pairs)
    out += ["", f"auto loses less than uniform in {better} of {len(pairs)} cells."]
    for model in dict.fromkeys(k[0] for k, _, _ in pairs):
        mine = [(k, u, a) for k, u, a in pairs if k[0] == model]
        out += [
            "",
            f"## Channels per unit, {model}: uniform → auto",
            "",
            "| unit | " + " | ".join(f"{k[1]} {k[2]:g}×" for k, _, _ in mine) + " |",
            "|---|" + "---|" * len(mine),
        ]
        for unit in mine[0][1]["channels"]:
            cells = [f"{u['channels'][unit]} → {a['channels'][unit]}" for _, u, a in mine]
            out.append(f"| {unit} | " + " | ".join(cells) + " |")
    md.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
