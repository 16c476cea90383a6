"""The allocation profile's two sensitivities on the shipped models, side by side.

``allocation="auto"`` turns each unit's layer error into output error with a
sensitivity (recon/profile.py). recon measures it from one forward and one backward
pass of the first 256 calibration images (``"gradient"``, recon/sensitivity.py); the
older ``"probe"`` pruned a copy of the network per unit and ran 64 held-out
calibration images through it. For each shipped model and speed-up this script
prunes with both (obs, 1,000 calibration images drawn with the seed from the train
split, no fine-tuning) and reports top-1 on the test split, the profile's time and the
Spearman rank correlation of the units' sensitivities; ``--uniform`` adds the uniform
split for reference. Writes ``<out-dir>/sensitivity.md`` and ``sensitivity.jsonl``.

    python scripts/sensitivity_compare.py                 # docs/ (about 10 min, 2 cores)
    python scripts/sensitivity_compare.py --quick --out-dir /tmp/s   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args

import recon
from recon import api, profile
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.models import pretrained

MODELS = ("vgg16_fmnist", "resnet20_fmnist", "mobilenetv2_fmnist")


def run(name, calib, test, speedup: float, mode: str, seed: int) -> dict:
    """Prune ``name`` with the sensitivity ``mode`` (or ``"uniform"``); its row."""
    net = pretrained(name).eval()
    saved = api.profile_units
    if mode != "uniform":
        api.profile_units = functools.partial(profile.profile_units, sensitivity=mode)
    try:
        t0 = time.perf_counter()
        res = recon.prune(
            net, calib, speedup=speedup, allocation="uniform" if mode == "uniform" else "auto",
            seed=seed, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    finally:
        api.profile_units = saved
    alloc = res.report.allocation
    return {
        "model": name, "speedup": speedup, "mode": mode, "acc": evaluate(res.model, *test),
        "seconds": seconds, "profile_seconds": res.report.phases.get("profile", 0.0),
        "sensitivity": {r.name: r.sensitivity for r in alloc.rows} if alloc else {},
        "channels": res.channels,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--models", type=_args.names(MODELS, "models"), default=MODELS)
    p.add_argument("--speedups", type=_args.ratios("speed-ups", "2,4"), default=(2.0, 4.0))
    p.add_argument("--calib", type=_args.int_at_least(1), default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uniform", action="store_true", help="also the uniform split")
    p.add_argument("--out-dir", type=Path, default=Path("docs"))
    p.add_argument("--quick", action="store_true", help="64 calibration and 300 test images")
    args = p.parse_args(argv)
    if args.quick:
        args.calib = 64
    x = to_tensor32(load_fashion_mnist("train")[0])
    calib = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))]
    calib = calib[: args.calib]
    images, labels = load_fashion_mnist("test")
    test = to_tensor32(images), torch.from_numpy(labels)
    if args.quick:
        test = test[0][:300], test[1][:300]
    modes = ("probe", "gradient", *(("uniform",) if args.uniform else ()))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows, base = [], {}
    t_all = time.perf_counter()
    with (args.out_dir / "sensitivity.jsonl").open("w") as fh:
        for name in args.models:
            base[name] = evaluate(pretrained(name).eval(), *test)
            for s in args.speedups:
                for mode in modes:
                    row = run(name, calib, test, s, mode, args.seed)
                    row["base"] = base[name]
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    print(f"{name} {s:g}x {mode}: {row['acc']:.2%}, {row['seconds']:.0f} s")
    minutes = (time.perf_counter() - t_all) / 60
    cmd = "python scripts/sensitivity_compare.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    (args.out_dir / "sensitivity.md").write_text(
        markdown(rows, cmd.strip(), minutes, args.calib, len(test[1]), args.seed)
    )


def markdown(rows: list[dict], cmd: str, minutes: float, calib: int, test: int, seed: int) -> str:
    by = {(r["model"], r["speedup"], r["mode"]): r for r in rows}
    modes = [m for m in ("probe", "gradient", "uniform") if any(r["mode"] == m for r in rows)]
    out = [
        "# Sensitivities: one backward pass against a probe per unit",
        "",
        f"Generated by `{cmd}` in {minutes:.0f} min on {platform.machine()} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}, a machine shared "
        f"with other jobs: the times compare within a row only). Shipped models, obs, "
        f'`allocation="auto"`, {calib:,} calibration images drawn with seed {seed} from the '
        f"Fashion-MNIST train split, top-1 on {test:,} test images, no fine-tuning. *probe*: "
        "the older sensitivity, each unit pruned alone in a copy and 64 held-out "
        "calibration images run through it; *gradient*: recon's, every unit's first-order "
        "output error from one backward pass of the first 256 calibration images. Loss = "
        "points below the unpruned model; *rank corr.*: Spearman correlation of the units' "
        "sensitivities under the two.",
        "",
        "| model | speedup | "
        + " | ".join(f"{m} loss" for m in modes)
        + " | profile s (probe / gradient) | rank corr. |",
        "|---|---|" + "---|" * len(modes) + "---|---|",
    ]
    for model, s in dict.fromkeys((r["model"], r["speedup"]) for r in rows):
        cells = [by.get((model, s, m)) for m in modes]
        loss = [f"{100 * (c['base'] - c['acc']):.2f}" if c else "" for c in cells]
        pr, gr = by.get((model, s, "probe")), by.get((model, s, "gradient"))
        times = corr = ""
        if pr and gr:
            times = f"{pr['profile_seconds']:.1f} / {gr['profile_seconds']:.1f}"
            names = list(pr["sensitivity"])
            rho = spearmanr([pr["sensitivity"][n] for n in names],
                            [gr["sensitivity"][n] for n in names]).statistic  # fmt: skip
            corr = f"{rho:.2f}"
        out.append(f"| {model} | {s:g}× | " + " | ".join(loss) + f" | {times} | {corr} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
