"""Regenerate the published results table: every shipped Fashion-MNIST model pruned by
every method, with and without least-squares re-fitting, before and after a short
fine-tune.

For each model, target speed-up (FLOPs ratio), method and re-fitting, the script prunes
with calibration images drawn (seeded) from the Fashion-MNIST train split, measures
top-1 accuracy on the test split, fine-tunes a copy with ``recon.finetune.finetune``
and measures it again. Each run appends one JSON line to ``<out-dir>/results.jsonl`` as
soon as it ends (``--resume`` skips the runs already there); at the end the script
writes ``<out-dir>/results.md`` and one plot ``<out-dir>/results_<model>.png`` per model.

    python scripts/reproduce.py                      # the full table (hours on a CPU)
    python scripts/reproduce.py --resume             # go on after an interruption
    python scripts/reproduce.py --quick --out-dir /tmp/quick   # smoke test (a minute)
    torchrun --nproc_per_node=2 scripts/reproduce.py   # split over 2 processes (rank 0 writes)
    python scripts/reproduce.py --schedule oneshot,iterative:4 --out-dir docs/iterative

``--schedule iterative:K`` prunes in K rounds with ``recon.iterative_prune`` (each round
to the next geometric step of the FLOPs target, then ``--ft-steps / K`` fine-tuning
steps); ``--allocations scan`` splits each target as Li et al.'s sensitivity analysis
does (``recon.sensitivity_scan`` once per model, on validation images drawn from the
train split apart from the calibration images; cached in ``<out-dir>/scan_<model>.json``
and drawn in ``scan_<model>.png``).

Under ``torchrun`` every process makes the same runs: ``recon.prune`` splits the
calibration images and ``recon.finetune.finetune`` each mini-batch between the
processes, and only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from recon._progress import progress_bar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args
import _scratch

import recon
from recon.api import ALLOCATIONS, GLOBAL_ALLOCATIONS
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.distributed import join_torchrun, leave_torchrun
from recon.finetune import finetune
from recon.models import pretrained, pretrained_names
from recon.ranking import MIN_KEEP
from recon.scan import ScanResult
from recon.select import METHODS
from recon.solve import RECONSTRUCT

DEFAULT_MODELS = "vgg16_fmnist,resnet20_fmnist"
DEFAULT_SPEEDUPS = (2.0, 3.0, 4.0)
VGG_EXTRA_SPEEDUPS = (5.0,)  # VGG-16 is also pruned 5x, as in He et al. 2017
# --quick: what each option defaults to in a smoke test (explicit options still win)
QUICK = {
    "calib": 128,
    "speedups": (2.0,),
    "methods": ("lasso", "thinet"),
    "ft_steps": 5,
    "n_test": 500,
    "scratch_scale": 0.002,  # a few SGD steps per scratch run
}
DEFAULTS = {"calib": 1000, "ft_steps": 300, "n_test": None, "scratch_scale": 1.0}
RESULTS, TABLE = "results.jsonl", "results.md"
ONESHOT = "oneshot"
#: --allocations scan: Li et al.'s split from recon.sensitivity_scan (not a recon.prune one)
SCAN = "scan"
# The quality bar of the least-squares re-fit with recon's default selection and He et
# al.'s (BAR_METHODS): (model, target speed-up, after fine-tuning?, largest accepted loss
# of top-1 in points).
BAR_METHODS = ("obs", "lasso")
# The runs --recover recovers by default (with reconstruct="lstsq"): those of the bars.
RECOVER_METHODS = BAR_METHODS
QUALITY_BARS = (
    ("vgg16_fmnist", 2.0, False, 0.5),
    ("vgg16_fmnist", 4.0, False, 1.5),
    ("vgg16_fmnist", 2.0, True, 0.3),
    ("vgg16_fmnist", 4.0, True, 0.8),
    ("resnet20_fmnist", 2.0, False, 1.0),
)


# --------------------------------------------------------------------------- options


def _float_in(ok: Callable[[float], bool], want: str) -> Callable[[str], float]:
    """An argparse type: a float for which ``ok`` holds, else "must be <want>"."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}. Got {text!r} instead.")
        return value

    return parse


_positive_float = _float_in(lambda v: math.isfinite(v) and v > 0, "a float > 0")
_unit_float = _float_in(lambda v: 0 <= v <= 1, "a float in [0, 1]")
_open_unit = _float_in(lambda v: 0 < v < 1, "a float in (0, 1)")


def _float_list(text: str) -> tuple[float, ...]:
    """A comma-separated list of floats in (0, 1)."""
    return tuple(_open_unit(t) for t in text.split(",") if t.strip())


def _schedules(text: str) -> tuple[str, ...]:
    """``oneshot`` and/or ``iterative:K`` (K >= 1), comma-separated."""
    out = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        kind, _, k = t.partition(":")
        if t == ONESHOT or (kind == "iterative" and k.isdigit() and int(k) >= 1):
            out.append(t if t == ONESHOT else f"iterative:{int(k)}")
        else:
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of oneshot and iterative:K (K an int >= 1). "
                f"Got {text!r} instead."
            )
    if not out:
        raise argparse.ArgumentTypeError(f"must name at least one schedule. Got {text!r} instead.")
    return tuple(out)


def _rounds(schedule: str) -> int:
    """K of ``iterative:K`` (0 for one shot)."""
    return 0 if schedule == ONESHOT else int(schedule.partition(":")[2])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        type=lambda s: tuple(n.strip() for n in s.split(",") if n.strip()),
        default=tuple(DEFAULT_MODELS.split(",")),
        help=f"shipped models to prune; names not shipped are skipped ({DEFAULT_MODELS})",
    )
    parser.add_argument(
        "--speedups",
        type=_args.ratios("FLOPs ratios", "2,3,4"),
        help="target FLOPs ratios (2,3,4, and 5 for VGG models; 2 with --quick)",
    )
    parser.add_argument(
        "--methods",
        type=_args.names(METHODS, "methods"),
        help=f"channel selection methods ({','.join(METHODS)}; lasso,thinet with --quick)",
    )
    parser.add_argument(
        "--reconstruct",
        type=_args.names(RECONSTRUCT, "re-fitting methods"),
        default=("lstsq", "none"),
        help="re-fitting methods (lstsq,none)",
    )
    parser.add_argument(
        "--allocations",
        type=_args.names((*ALLOCATIONS, SCAN), "allocations"),
        default=("uniform",),
        help="how each FLOPs target is split into channels per layer: uniform, auto "
        "(recon.prune's allocation=; comma-separated, e.g. uniform,auto), or scan (Li et "
        "al.'s sensitivity analysis, recon.sensitivity_scan) (uniform)",
    )
    parser.add_argument(
        "--schedule",
        type=_schedules,
        default=(ONESHOT,),
        help="oneshot (prune, then fine-tune) and/or iterative:K (recon.iterative_prune: K "
        "rounds of pruning, each followed by --ft-steps/K steps), comma-separated (oneshot)",
    )
    parser.add_argument(
        "--scan-ratios",
        type=_float_list,
        default=(0.75, 0.5, 0.25),
        help="--allocations scan: the keep ratios each unit is pruned to alone (0.75,0.5,0.25)",
    )
    parser.add_argument(
        "--scan-val",
        type=_args.int_at_least(1),
        default=1000,
        help="--allocations scan: validation images, drawn from the train split apart from "
        "the calibration images (1000)",
    )
    parser.add_argument(
        "--scan-tolerance",
        type=_unit_float,
        default=0.01,
        help="--allocations scan: accuracy a unit may lose alone at the shared ratio and "
        "still be pruned; the others keep every channel (0.01)",
    )
    parser.add_argument(
        "--min-keep",
        type=_float_in(lambda v: 0 <= v < 1, "a float in [0, 1)"),
        default=MIN_KEEP,
        help="the global allocations' floor: the share of its channels every layer keeps "
        f"(recon.prune's min_keep=) ({MIN_KEEP:g})",
    )
    parser.add_argument(
        "--calib",
        type=_args.int_at_least(1),
        help="calibration images drawn from the train split (1000; 128 with --quick)",
    )
    parser.add_argument(
        "--n-test",
        type=_args.int_at_least(1),
        help="evaluate on a seeded subset of this many test images (all 10,000; 500 with --quick)",
    )
    parser.add_argument(
        "--ft-steps", type=_args.int_at_least(1), help="fine-tuning SGD steps (300; 5 with --quick)"
    )
    parser.add_argument(
        "--ft-lr", type=_positive_float, default=0.01, help="fine-tuning peak learning rate (0.01)"
    )
    parser.add_argument(
        "--ft-distill",
        type=_unit_float,
        default=0.0,
        help="share of the fine-tuning loss that distils the original model's logits "
        "(recon.finetune.finetune's teacher=, distill=); 0 trains on the labels only (0)",
    )
    parser.add_argument(
        "--ft-temperature",
        type=_positive_float,
        default=4.0,
        help="distillation temperature, used when --ft-distill > 0 (4)",
    )
    parser.add_argument("--no-finetune", action="store_true", help="skip fine-tuning")
    parser.add_argument(
        "--recover",
        type=_args.int_at_least(0),
        default=0,
        metavar="STEPS",
        help="also recover the --recover-methods runs without labels (recon.recover, "
        "STEPS steps on the calibration images): one-shot, recovered and fine-tuned side by "
        "side; with --resume, runs already made get their recovery added (0: none)",
    )
    parser.add_argument(
        "--recover-methods",
        type=_args.names(METHODS, "methods"),
        default=RECOVER_METHODS,
        help="the methods whose runs --recover recovers (obs,lasso; re-fit lstsq only)",
    )
    parser.add_argument(
        "--scratch",
        type=_args.names(_scratch.KINDS, "scratch kinds"),
        default=(),
        help="also train the LASSO + lstsq architectures again from the start: scratch_e, "
        "scratch_b (Liu et al. 2019), ticket (Frankle & Carbin 2019), comma-separated; "
        "each a full training run with the original's recipe (none)",
    )
    parser.add_argument(
        "--scratch-speedups",
        type=_args.ratios("FLOPs ratios", "2,4"),
        default=_scratch.SPEEDUPS,
        help="the targets whose architectures --scratch trains (2,4)",
    )
    parser.add_argument(
        "--scratch-scale",
        type=_positive_float,
        help="multiply the epochs of every --scratch run by this (1; 0.002 with --quick)",
    )
    parser.add_argument(
        "--seed",
        type=_args.int_at_least(0),
        default=0,
        help="seeds the calibration draw, pruning, test subset and fine-tuning (0)",
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu)")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("docs"), help="where the results go (docs/)"
    )
    parser.add_argument(
        "--resume", action="store_true", help=f"keep the rows of {RESULTS}, skip those runs"
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help=f"run nothing: write the tables and plots from the rows already in {RESULTS} "
        "(runs not done yet are blank cells)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 128 calibration images, 2x only, lasso and thinet, 5 fine-tuning "
        "steps, 500 test images, --scratch runs of a few steps",
    )
    return parser


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the options left unset from --quick or the defaults, and check them."""
    base = QUICK if args.quick else {}
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, base.get(key, default))
    if args.methods is None:
        args.methods = QUICK["methods"] if args.quick else METHODS
    if args.speedups is None and args.quick:
        args.speedups = QUICK["speedups"]
    if args.calib > 60_000:
        parser.error(f"argument --calib: must be at most 60000. Got {args.calib} instead.")
    if args.n_test is not None and args.n_test > 10_000:
        parser.error(f"argument --n-test: must be at most 10000. Got {args.n_test} instead.")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"argument --device: not a torch device: {args.device!r}.")
    if args.no_finetune:
        args.ft_steps = 0
    if SCAN in args.allocations and any(s != ONESHOT for s in args.schedule):
        parser.error("argument --allocations: scan applies to --schedule oneshot only.")
    if SCAN in args.allocations and args.calib + args.scan_val > 60_000:
        parser.error("argument --scan-val: --calib + --scan-val must be at most 60000.")


def _speedups_of(model: str, args: argparse.Namespace) -> tuple[float, ...]:
    if args.speedups is not None:
        return args.speedups
    return DEFAULT_SPEEDUPS + (VGG_EXTRA_SPEEDUPS if model.startswith("vgg") else ())


# --------------------------------------------------------------------------- rows


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a row depends on besides its model, target, method and re-fitting."""
    return {
        "calib": args.calib,
        "n_test": args.n_test,
        "ft_steps": args.ft_steps,
        "ft_lr": args.ft_lr if args.ft_steps else None,
        **_distill_settings(args),
        "seed": args.seed,
    }


def _distill_settings(args: argparse.Namespace) -> dict[str, float]:
    """The distillation settings of a row; none for label-only fine-tuning (rows made
    before the option have none and were all label-only)."""
    if not args.ft_steps or not args.ft_distill:
        return {}
    return {"ft_distill": args.ft_distill, "ft_temperature": args.ft_temperature}


def _alloc(row: dict[str, Any]) -> str:
    """A row's allocation; rows recorded before the option were all uniform."""
    return row.get("allocation", "uniform")


def _min_keep(allocation: str, args: argparse.Namespace) -> dict[str, float]:
    """A row's floor, for the global allocations only."""
    return {"min_keep": args.min_keep} if allocation in GLOBAL_ALLOCATIONS else {}


def _schedule(row: dict[str, Any]) -> str:
    """A row's schedule; rows recorded before the option were all one-shot."""
    return row.get("schedule", ONESHOT)


def _oneshot(row: dict[str, Any]) -> bool:
    return _schedule(row) == ONESHOT


def _variant(row: dict[str, Any]) -> str:
    """A row's allocation, and its schedule unless one-shot (the tables' third column)."""
    return _alloc(row) + ("" if _schedule(row) == ONESHOT else f" · {_schedule(row)}")


def _scan_settings(allocation: str, args: argparse.Namespace) -> dict[str, Any]:
    """A row's scan settings, for ``--allocations scan`` only."""
    if allocation != SCAN:
        return {}
    return {"scan": {"ratios": list(args.scan_ratios), "val": args.scan_val,
                     "tolerance": args.scan_tolerance}}  # fmt: skip


def _key(row: dict[str, Any]) -> tuple:
    settings = tuple(row[k] for k in ("calib", "n_test", "ft_steps", "ft_lr", "seed"))
    settings += (row.get("ft_distill"), row.get("ft_temperature"))
    # global rows made before the floor had none
    settings += (row.get("min_keep", 0.0) if _alloc(row) in GLOBAL_ALLOCATIONS else None,)
    settings += (_schedule(row), json.dumps(row.get("scan"), sort_keys=True))
    what = (row["model"], float(row["target"]), row["method"], row["reconstruct"], _alloc(row))
    return (*what, *settings)


def _load_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a run killed while writing its line
                print(f"{path}:{i}: skipping a broken line", file=sys.stderr)
    return rows


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


# --------------------------------------------------------------------------- data


class _Data:
    """Fashion-MNIST, loaded on first use: the train split is not needed to resume."""

    def __init__(self, seed: int, n_test: int | None):
        self.seed, self.n_test = seed, n_test
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._train is None:
            images, labels = load_fashion_mnist("train")
            self._train = to_tensor32(images), torch.from_numpy(labels)  # (60000, 1, 32, 32)
        return self._train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            images, labels = load_fashion_mnist("test")
            x, y = to_tensor32(images), torch.from_numpy(labels)
            if self.n_test is not None and self.n_test < len(y):
                g = torch.Generator().manual_seed(self.seed)
                idx = torch.randperm(len(y), generator=g)[: self.n_test].sort().values
                x, y = x[idx], y[idx]
            self._test = x, y
        return self._test

    def calib(self, n: int) -> torch.Tensor:
        x, _ = self.train
        g = torch.Generator().manual_seed(self.seed)
        return x[torch.randperm(len(x), generator=g)[:n]]  # (n, 1, 32, 32)

    def val(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` labelled train images, the last of the calibration draw's order (apart
        from the calibration images while both together are at most 60,000)."""
        x, y = self.train
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(x), generator=g)[-n:]
        return x[idx], y[idx]


class _Scans:
    """``recon.sensitivity_scan`` of each model, made on first use and kept in
    ``<out-dir>/scan_<model>.json`` (a resumed table reads it back), drawn in
    ``scan_<model>.png``."""

    def __init__(self, args: argparse.Namespace, data: _Data, say: Callable[..., None]):
        self.args, self.data, self.say, self._scans = args, data, say, {}

    def get(self, model: str, net: torch.nn.Module, method: str) -> ScanResult:
        key = (model, method)
        if key in self._scans:
            return self._scans[key]
        a = self.args
        path = a.out_dir / f"scan_{model}.json"
        want = {"ratios": list(a.scan_ratios), "val": a.scan_val, "calib": a.calib,
                "seed": a.seed, "method": method}  # fmt: skip
        saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        example = self.data.calib(1)
        if saved.get("settings") == want:
            scan = ScanResult.from_dict(saved["scan"], net, example)
        else:
            t0 = time.perf_counter()
            scan = recon.sensitivity_scan(
                net, self.data.calib(a.calib).split(100), self.data.val(a.scan_val),
                ratios=a.scan_ratios, method=method, reconstruct=("lstsq", "none"),
                prune_options={"seed": a.seed, "device": a.device}, progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            if a.world == 1 or dist.get_rank() == 0:
                path.write_text(
                    json.dumps({"settings": want, "seconds": seconds, "scan": scan.as_dict()}),
                    encoding="utf-8",
                )
                scan.plot(str(a.out_dir / f"scan_{model}.png"))
            self.say(f"{model}: sensitivity scan ({method}) in {seconds:.0f} s")
        self._scans[key] = scan
        return scan


def _run(
    net: torch.nn.Module,
    data: _Data,
    args: argparse.Namespace,
    model: str,
    target: float,
    method: str,
    rec: str,
    allocation: str = "uniform",
    schedule: str = ONESHOT,
) -> dict[str, Any]:
    """Prune, evaluate, fine-tune a copy and evaluate again: one row."""
    if schedule != ONESHOT:
        return _run_iterative(net, data, args, model, target, method, rec, allocation, schedule)
    x_test, y_test = data.test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = _prune(net, data, args, target, method, rec, allocation, model)
        prune_seconds = time.perf_counter() - t0
    acc = evaluate(res.model, x_test, y_test)
    acc_ft = ft_seconds = None
    if args.ft_steps:
        tuned = copy.deepcopy(res.model)
        x_train, y_train = data.train
        t0 = time.perf_counter()
        finetune(
            tuned,
            x_train,
            y_train,
            steps=args.ft_steps,
            lr=args.ft_lr,
            teacher=net if args.ft_distill else None,
            distill=args.ft_distill,
            temperature=args.ft_temperature,
            seed=args.seed,
            progress=False,
        )
        ft_seconds = time.perf_counter() - t0
        acc_ft = evaluate(tuned, x_test, y_test)
    report = res.report
    row = {
        "model": model,
        "target": target,
        "method": method,
        "reconstruct": rec,
        "allocation": allocation,
        **_min_keep(allocation, args),
        **_scan_settings(allocation, args),
        **_settings(args),
        "speedup": _finite(report.speedup),
        "params_ratio": _finite(report.params_ratio),
        "acc": acc,
        "acc_ft": acc_ft,
        "error_before": _mean([layer.error_before for layer in report.layers]),
        "error_after": _mean([layer.error_after for layer in report.layers]),
        "output_error": _finite(report.output_error),
        "prune_seconds": prune_seconds,
        "ft_seconds": ft_seconds,
        "channels": res.channels,
        "layer_errors": {
            layer.name: [_finite(layer.error_before), _finite(layer.error_after)]
            for layer in report.layers
        },
        "warnings": sorted({str(w.message) for w in caught}),
    }
    if allocation == SCAN:  # the units the scan kept whole
        row["sensitive"] = [u for u, r in res.plan["target"]["keep_ratio"].items() if r >= 1]
    if _recovers(row, args):
        row.update(_recovery(net, res, data, args))
    return row


def _run_iterative(
    net, data, args, model: str, target: float, method: str, rec: str, allocation: str,
    schedule: str,
) -> dict[str, Any]:  # fmt: skip
    """``recon.iterative_prune`` in ``K`` rounds sharing ``--ft-steps``, evaluated: one row
    (``acc`` is None: there is no one-shot model; ``acc_ft`` the final accuracy). An
    interrupted run goes on from its last round (a checkpoint in ``<out-dir>/.iterative``)."""
    k = _rounds(schedule)
    folder = args.out_dir / ".iterative"
    ckpt = folder / f"{model}_{target:g}x_{method}_{rec}_{allocation}_{k}.pt"
    teacher = {"teacher": net, "distill": args.ft_distill, "temperature": args.ft_temperature}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = recon.iterative_prune(
            net, data.calib(args.calib).split(100), data.train, speedup=target, rounds=k,
            finetune_steps=args.ft_steps, method=method, reconstruct=rec,
            prune_options={"allocation": allocation, **_min_keep(allocation, args),
                           "sampler_layers": method != "bn_gamma", "device": args.device},
            finetune_options={"lr": args.ft_lr, **(teacher if args.ft_distill else {})},
            seed=args.seed, checkpoint=ckpt if args.world == 1 else None, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    acc = evaluate(out.model, *data.test)
    last = next(r.report for r in reversed(out.rounds) if r.report is not None)
    prune_seconds = sum(r.report.seconds for r in out.rounds if r.report is not None)
    return {
        "model": model,
        "target": target,
        "method": method,
        "reconstruct": rec,
        "allocation": allocation,
        **_min_keep(allocation, args),
        **_settings(args),
        "schedule": schedule,
        "speedup": _finite(out.speedup),
        "params_ratio": _finite(out.rounds[0].report.params_before / last.params_after),
        "acc": None if args.ft_steps else acc,
        "acc_ft": acc if args.ft_steps else None,
        "error_before": _mean([layer.error_before for layer in last.layers]),
        "error_after": _mean([layer.error_after for layer in last.layers]),
        "output_error": _finite(last.output_error),
        "prune_seconds": prune_seconds,
        "ft_seconds": (seconds - prune_seconds) if args.ft_steps else None,
        "channels": out.rounds[-1].channels,
        "rounds": [{k: v for k, v in r.as_dict().items() if k != "channels"} for r in out.rounds],
        "warnings": sorted({str(w.message) for w in caught}),
        "_checkpoint": str(ckpt),
    }


def _prune(net, data, args, target: float, method: str, rec: str, allocation: str, model=None):
    if allocation == SCAN:  # Li et al.'s split: sensitive units whole, the rest one ratio
        scan = args.scans.get(model, net, method)
        ratios = scan.keep_ratio(speedup=target, tolerance=args.scan_tolerance, reconstruct=rec)
        target_kw = {"keep_ratio": ratios}
    else:
        target_kw = {"speedup": target, "allocation": allocation, **_min_keep(allocation, args)}
    return recon.prune(
        net,
        data.calib(args.calib).split(100),
        method=method,
        reconstruct=rec,
        **target_kw,
        # a residual block's input has no BatchNorm of its own: bn_gamma prunes the
        # blocks' inner channels only
        sampler_layers=method != "bn_gamma",
        seed=args.seed,
        device=args.device,
        progress=False,
    )


def _recovers(row: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether ``--recover`` applies to ``row`` and it has no recovery of that length."""
    return (
        args.recover > 0
        and "train" not in row
        and _schedule(row) == ONESHOT
        and row["method"] in args.recover_methods
        and row["reconstruct"] == "lstsq"
        and row.get("rec_steps") != args.recover
    )


def _recovery(net, res, data, args: argparse.Namespace) -> dict[str, Any]:
    """``recon.recover`` of a pruned result on the run's calibration images, evaluated."""
    out = recon.recover(
        res, net, data.calib(args.calib), steps=args.recover, seed=args.seed, progress=False
    )
    r = out.report
    return {
        # the one-shot model recovered (a resumed row's was pruned again: its accuracy
        # shows whether today's code prunes it as the row's run did)
        "acc_rec_oneshot": evaluate(res.model, *data.test),
        "acc_rec": evaluate(out.model, *data.test),
        "rec_steps": args.recover,
        "rec_seconds": r.seconds,
        "rec_heldout": [_finite(r.error_before), _finite(r.error_after)],
    }


# --------------------------------------------------------------------------- output


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


#: Method pairs whose papers make a claim the main table can check: (method, against,
#: what is compared).
PAPER_PAIRS = (
    ("apoz", "l1", "APoZ ≈ L1? (Hu et al. 2016's zeros against Li et al. 2017's weight norms)"),
    (
        "bn_gamma",
        "l1",
        "Network Slimming's |γ| against L1, both with the uniform split (Slimming's global "
        "threshold and sparsity training: docs/slimming/results.md)",
    ),
)
NOISE = 0.5  # points: one seed, a difference under half a point is within noise


def _paper_findings(model: str, rows: list[dict[str, Any]]) -> list[str]:
    """Whether each :data:`PAPER_PAIRS` claim holds on ``model``, from its uniform rows:
    the accuracy differences, one-shot (with the re-fit only: without it both are near
    chance) and after fine-tuning."""
    by = {(r["method"], r["reconstruct"], r["target"]): r for r in rows if _alloc(r) == "uniform"}
    out = []
    for method, other, what in PAPER_PAIRS:
        parts, diffs = [], []
        for rec, keys in (("lstsq", ("acc", "acc_ft")), ("none", ("acc_ft",))):
            targets = sorted(
                t for m, r, t in by if m == method and r == rec and (other, r, t) in by
            )
            for key in keys:
                pairs = [(by[(method, rec, t)][key], by[(other, rec, t)][key]) for t in targets]
                if not targets or any(a is None or b is None for a, b in pairs):
                    continue  # not fine-tuned
                d = [a - b for a, b in pairs]
                diffs += [100 * v for v in d]
                when = "one-shot" if key == "acc" else "after fine-tuning"
                parts.append(
                    f"{'with' if rec == 'lstsq' else 'without'} the re-fit, {when}: "
                    + " / ".join(f"{100 * v:+.2f}" for v in d)
                    + " at "
                    + " / ".join(f"{t:g}×" for t in targets)
                )
        if not diffs:
            continue
        near = sum(abs(v) <= NOISE for v in diffs)
        better = sum(v > NOISE for v in diffs)
        worse = sum(v < -NOISE for v in diffs)
        verdict = (
            "holds here: every difference is within noise"
            if near == len(diffs)
            else f"{method} is ahead by more than {NOISE} point in {better}, behind in "
            f"{worse}, within noise in {near} of {len(diffs)} cells"
        )
        out.append(f"- {what}: {method} − {other}, points, " + "; ".join(parts) + f". {verdict}.")
    if not out:
        return []
    return [f"#### {model}: what the papers found, checked here", "", *out, ""]


def _model_table(
    model: str, rows: list[dict[str, Any]], base: float, args: argparse.Namespace
) -> list[str]:
    speedups = sorted({r["target"] for r in rows})
    by = {(r["method"], r["reconstruct"], _variant(r), r["target"]): r for r in rows}

    def measured(s: float) -> str:
        values = sorted({round(r["speedup"], 2) for r in rows if r["target"] == s})
        return "/".join(f"{v:.2f}" for v in values)

    cell = (
        f"top-1 accuracy without fine-tuning / after {args.ft_steps} fine-tuning steps"
        if args.ft_steps
        else "top-1 accuracy, no fine-tuning"
    )
    lines = [
        f"### {model}",
        "",
        f"Original accuracy: {_pct(base)}. Each cell: {cell}. Header: target FLOPs ratio "
        "(measured).",
        "",
        "| method | reconstruct | allocation | "
        + " | ".join(f"{s:g}× ({measured(s)}×)" for s in speedups)
        + " |",
        "|---|---|---|" + "---:|" * len(speedups),
    ]
    combos = [
        (method, rec, _variant({"allocation": alloc, "schedule": schedule}))
        for method in args.methods
        for rec in args.reconstruct
        for alloc in args.allocations
        for schedule in args.schedule
    ]
    for method, rec, alloc in combos:
        cells = []
        for s in speedups:
            r = by.get((method, rec, alloc, s))
            if r is None:
                cells.append("")
            elif args.ft_steps:
                cells.append(f"{_pct(r['acc'])} / {_pct(r['acc_ft'])}")
            else:
                cells.append(_pct(r["acc"]))
        lines.append(f"| {method} | {rec} | {alloc} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean per-layer relative reconstruction error before → after re-fitting · relative "
        "error of the logits on the calibration images · pruning time (s):",
        "",
        "| method | reconstruct | allocation | " + " | ".join(f"{s:g}×" for s in speedups) + " |",
        "|---|---|---|" + "---:|" * len(speedups),
    ]

    def err(x: float | None) -> str:
        if x is None:
            return "–"
        return f"{x:.3f}" if x == 0 or x >= 1e-3 else f"{x:.1e}"

    for method, rec, alloc in combos:
        cells = []
        for s in speedups:
            r = by.get((method, rec, alloc, s))
            cells.append(
                ""
                if r is None
                else f"{err(r['error_before'])} → {err(r['error_after'])} · "
                f"{err(r['output_error'])} · "
                f"{r['prune_seconds']:.1f}"
            )
        lines.append(f"| {method} | {rec} | {alloc} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _plot(model: str, rows: list[dict[str, Any]], base: float, path: Path, args) -> bool:
    """Accuracy loss against the original, in points: one row of panels for the re-fitted
    runs and one for ``reconstruct=none``, each on its own scale (without re-fitting a
    pruned network falls to chance, 50-80 points below the re-fitted ones, which would
    squeeze every re-fitted curve into a sliver of a shared axis)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        print("matplotlib is not installed: no plots (pip install recon[plot])", file=sys.stderr)
        return False
    columns = [("acc", "without fine-tuning")]
    if args.ft_steps:
        columns.append(("acc_ft", f"after {args.ft_steps} fine-tuning steps"))
    refits = [r for r in args.reconstruct if r != "none"]
    groups = [g for g in (refits, ["none"] if "none" in args.reconstruct else []) if g]
    fig, axes = plt.subplots(
        len(groups),
        len(columns),
        figsize=(5.5 * len(columns), 3.4 * len(groups) + 0.6),
        squeeze=False,
        sharex=True,
    )
    styles = {"lstsq": "-", "none": "--", "scale": ":"}
    markers = {"uniform": "o", "auto": "s"}
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    chance = 100 * (base - 0.1)  # Fashion-MNIST: 10 classes
    for row, group in zip(axes, groups, strict=True):
        for ax, (field, title) in zip(row, columns, strict=True):
            for method, rec, alloc in itertools.product(args.methods, group, args.allocations):
                pts = sorted(
                    (r["speedup"], r[field])
                    for r in rows
                    if (r["method"], r["reconstruct"], _alloc(r)) == (method, rec, alloc)
                    and r[field] is not None
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(
                        xs,
                        [100 * (base - y) for y in ys],
                        styles.get(rec, "-."),
                        marker=markers.get(alloc, "o"),
                        markersize=3,
                        color=colors[method],
                    )
            if group == ["none"] and field == "acc":
                ax.axhline(chance, color="gray", linewidth=0.8, linestyle=":")
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
            ax.axhline(0.0, color="gray", linewidth=0.8)
            kind = "reconstruct=" + ",".join(group)
            ax.set_title(f"{kind}, {title}", fontsize=10)
            ax.set_ylabel("accuracy loss (points)")
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("measured speed-up (FLOPs ratio)")
    if len(columns) > 1:  # after fine-tuning every run is close: one scale for the column
        top = max(ax.get_ylim()[1] for ax in axes[:, 1])
        for ax in axes[:, 1]:
            ax.set_ylim(top=top)
    handles = [
        Line2D([], [], color=colors[m], marker="o", markersize=3, label=m) for m in args.methods
    ]
    handles += [
        Line2D([], [], color="black", linestyle=styles.get(r, "-."), label=f"reconstruct={r}")
        for r in args.reconstruct
    ]
    if len(args.allocations) > 1:
        handles += [
            Line2D([], [], color="black", marker=markers.get(a, "o"), linestyle="", label=a)
            for a in args.allocations
        ]
    if "none" in args.reconstruct:
        handles.append(Line2D([], [], color="gray", linestyle=":", label="chance (1 in 10)"))
    fig.suptitle(
        f"{model}: top-1 accuracy lost against the original ({100 * base:.2f} %), lower is better",
        fontsize=11,
    )
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _recovered_table(rows: list[dict[str, Any]], bases: dict[str, float]) -> list[str]:
    """One-shot, recovered (``--recover``, no labels) and fine-tuned (labels) side by side."""
    mine = [r for r in rows if r.get("acc_rec") is not None]
    if not mine:
        return []
    steps = sorted({r["rec_steps"] for r in mine})
    lines = [
        "### One-shot, recovered without labels, fine-tuned with labels",
        "",
        f"Recovered: `recon.recover(result, model, calib, steps={'/'.join(map(str, steps))})` "
        "on the run's calibration images only (no labels; the weights with the lowest output "
        "error on a held-out quarter of them, the one-shot ones if no step lowered it). "
        "One-shot: the model recovered (for a run recovered after it was made, pruned "
        "again by the code of that day). Fine-tuned: the run's, on the labelled train "
        "split. Loss in points.",
        "",
        "| model | FLOPs | method | allocation | one-shot | recovered | fine-tuned | "
        "held-out output error | recover (s) |",
        "|---|---:|---|---|---:|---:|---:|---|---:|",
    ]
    order = sorted(mine, key=lambda r: (r["model"], r["target"], r["method"], _alloc(r)))
    for r in order:
        base = bases.get(r["model"], r.get("acc_original"))

        def loss(key: str, r=r, base=base) -> str:
            return "" if r.get(key) is None else f"{100 * (base - r[key]):.2f}"

        before, after = r["rec_heldout"]
        lines.append(
            f"| {r['model']} | {r['target']:g}× | {r['method']} | {_alloc(r)} | "
            f"{loss('acc_rec_oneshot')} | "
            f"{loss('acc_rec')} | {loss('acc_ft')} | {before:.4f} → {after:.4f} | "
            f"{r['rec_seconds']:.0f} |"
        )
    return [*lines, ""]


def _scan_lines(model: str, folder: Path, args: argparse.Namespace) -> list[str]:
    """What the sensitivity scan of ``model`` was, the split it gave at each target,
    and its plot (Li et al.'s Figure 2)."""
    saved = json.loads((folder / f"scan_{model}.json").read_text(encoding="utf-8"))
    st, scan = saved["settings"], saved["scan"]
    widths = scan["widths"]
    ratios = ", ".join(f"{r:g}" for r in st["ratios"])
    splits = []
    for r in sorted(
        (r for r in args.scan_rows if r["model"] == model),
        key=lambda r: (r["target"], r["reconstruct"]),
    ):
        share = {u: r["channels"][u] / w for u, w in widths.items()}
        counts = collections.Counter(round(v, 2) for v in share.values())
        common = counts.most_common(1)[0][0]
        # (a unit within one channel of the shared ratio is only rounded differently)
        less = [f"{u} {share[u]:.2f}" for u, w in widths.items() if share[u] > common + 1 / w]
        splits.append(
            f"{r['target']:g}× ({r['reconstruct']}): {common:.2f} shared"
            + (f"; pruned less: {', '.join(less)}" if less else "; no unit sensitive")
        )
    return [
        f"Allocation `scan` ({model}): `recon.sensitivity_scan` pruned each of the "
        f"{len(widths)} units alone ({st['method']}, with and without the re-fit) "
        f"to keep ratios {ratios} and measured the accuracy on {st['val']} train images "
        f"apart from the calibration images ({saved['seconds']:.0f} s); "
        f"`ScanResult.keep_ratio(speedup=..., tolerance={args.scan_tolerance:g})` gives "
        "every unit that loses more than the tolerance alone at the shared ratio its safe "
        "ratio (the lowest scanned ratio within the tolerance, 1 if none) and the others "
        "the largest shared ratio that meets the target (Li et al. 2017). Keep ratios: "
        + "; ".join(splits)
        + ".",
        "",
        f"![sensitivity scan of {model}](scan_{model}.png)",
        "",
    ]


def _quality_bars(
    rows: list[dict[str, Any]], bases: dict[str, float], folder: Path = Path("docs")
) -> list[str]:
    """The quality-bar table: obs and LASSO + least squares against :data:`QUALITY_BARS`, for a
    page written in ``folder`` (its link to docs/quality.md is relative to it)."""
    quality = Path(
        os.path.relpath(
            Path(__file__).resolve().parent.parent / "docs" / "quality.md", folder.resolve()
        )
    ).as_posix()
    out = []
    for (model, target, tuned, bar), method, alloc in itertools.product(
        QUALITY_BARS, BAR_METHODS, ALLOCATIONS
    ):
        row = next(
            (
                r
                for r in rows
                if (r["model"], r["target"], r["method"], r["reconstruct"], _alloc(r))
                == (model, target, method, "lstsq", alloc)
            ),
            None,
        )
        acc = None if row is None else row["acc_ft" if tuned else "acc"]
        if acc is None or model not in bases:
            continue
        drop = 100 * (bases[model] - acc)
        out.append(
            f"| {model} | {target:g}× | {method} | {alloc} | {'after' if tuned else 'without'} "
            f"| {_pct(acc)} | {drop:.2f} | ≤ {bar:g} | {'met' if drop <= bar else '**missed**'} |"
        )
    if not out:
        return []
    return [
        "### Quality bar (obs and LASSO, with the least-squares re-fit)",
        "",
        "| model | FLOPs | method | allocation | fine-tuning | top-1 | loss (points) | bar | |",
        "|---|---:|---|---|---|---:|---:|---:|---|",
        *out,
        "",
        f"Why the VGG-16 misses its bars, and what helps: [`quality.md`]({quality}) "
        "(`python scripts/quality_bar.py`).",
        "",
    ]


def _write_markdown(
    path: Path,
    argv: Sequence[str],
    args: argparse.Namespace,
    models: list[str],
    bases: dict[str, float],
    rows: list[dict[str, Any]],
    seconds: float,
) -> None:
    n_test = args.n_test or 10_000
    ft = (
        f"{args.ft_steps} SGD steps (`recon.finetune.finetune`: batch 128, momentum 0.9, "
        f"weight decay 5e-4, cosine learning rate from {args.ft_lr:g}, shifts and flips"
        + (
            f"; loss {1 - args.ft_distill:g} × cross-entropy + {args.ft_distill:g} × "
            f"distillation of the original's logits at temperature {args.ft_temperature:g}"
            if args.ft_distill
            else "; cross-entropy on the labels"
        )
        + ") on the 60,000-image train split"
        if args.ft_steps
        else "none"
    )
    scratch_rows = [r for r in rows if "train" in r]
    rows = [r for r in rows if "train" not in r]
    run_seconds = sum(r["prune_seconds"] + (r["ft_seconds"] or 0) for r in rows)
    run_seconds += sum(r["train_seconds"] for r in scratch_rows)
    world = getattr(args, "world", 1)
    processes, launcher = "", "python"
    if world > 1:  # run under torchrun
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        processes = f" × {world} processes ({dist.get_backend()})"
        launcher = f"torchrun --nproc_per_node={per_node}"
        if per_node != world:
            launcher += f" --nnodes={world // per_node}"
    # --resume and --table-only change what is run, not the results
    options = shlex.join(a for a in argv if a not in ("--resume", "--table-only"))
    command = f"{launcher} scripts/reproduce.py" + (f" {options}" if options else "")
    lines = [
        "# Reproduction: Fashion-MNIST models pruned by every method",
        "",
        f"- Machine: {platform.platform()}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}{processes}, "
        f"device {args.device}, "
        f"torch {torch.__version__}, "
        f"Python {platform.python_version()}, recon {recon.__version__}.",
        f"- Data: Fashion-MNIST (`recon.data.load_fashion_mnist`, `to_tensor32`); "
        f"{args.calib} calibration images drawn with seed {args.seed} from the train split; "
        f"top-1 accuracy on "
        + (
            "the 10,000-image test split."
            if n_test >= 10_000
            else f"{n_test} test images drawn with seed {args.seed}."
        ),
        f"- Seeds: {args.seed} (calibration draw, sampled positions, fine-tuning batches).",
        f"- Fine-tuning: {ft}.",
        *(
            [
                f"- Schedules: {', '.join(args.schedule)}. `iterative:K`: "
                "`recon.iterative_prune`, K rounds, round i pruning to the FLOPs target "
                "s^(i/K) of the original (s the column's target) and fine-tuning "
                f"{args.ft_steps}/K steps (each with its own cosine learning rate; the same "
                "total as one-shot), the cells show `–` for the one-shot accuracy and the "
                "final accuracy after the last round."
            ]
            if any(not_one != ONESHOT for not_one in args.schedule)
            else []
        ),
        *(
            [
                f"- Global allocations: every layer keeps at least {args.min_keep:g} of its "
                "channels (`recon.prune`'s `min_keep`)."
            ]
            if set(args.allocations) & set(GLOBAL_ALLOCATIONS)
            else []
        ),
        f"- Command: `{command}`.",
        f"- Run time: {seconds:.0f} s for this invocation; {run_seconds:.0f} s of pruning, "
        f"{'training from the start ' if scratch_rows else ''}and fine-tuning summed over the "
        f"{len(rows) + len(scratch_rows)} runs (see `{RESULTS}` for every run). "
        "Times are each run's wall clock as recorded: runs made in different sessions, "
        "code versions or machine loads (a resumed table) are not comparable.",
        "",
    ]
    if getattr(args, "missing", 0):
        lines += [
            f"**Partial table**: {args.missing} of {args.missing + len(rows)} runs are not done "
            "yet (blank cells); `python scripts/reproduce.py --resume` completes them.",
            "",
        ]
    warned = sum(1 for r in rows if r["warnings"])
    if warned:
        lines += [
            f"{warned} of {len(rows)} runs warned (e.g. under-determined re-fits); the "
            f"messages are in `{RESULTS}`.",
            "",
        ]
    copied = sorted({r["copied_from"] for r in rows if "copied_from" in r})
    if copied:
        n = sum(1 for r in rows if "copied_from" in r)
        lines += [
            f"{n} of {len(rows)} rows were copied from {', '.join(f'`{c}`' for c in copied)} "
            "(the same settings, made earlier by the command recorded there; their rows "
            "carry `copied_from`), the others made by this command.",
            "",
        ]
    oneshot = [r for r in rows if _oneshot(r)]
    args.scan_rows = [r for r in rows if _alloc(r) == SCAN]
    lines += _quality_bars(oneshot, bases, path.parent)
    lines += _recovered_table(oneshot, bases)
    for model in models:
        lines += _model_table(model, [r for r in rows if r["model"] == model], bases[model], args)
        lines += _paper_findings(model, [r for r in oneshot if r["model"] == model])
        if (path.parent / f"scan_{model}.png").exists() and SCAN in args.allocations:
            lines += _scan_lines(model, path.parent, args)
        if (path.parent / f"results_{model}.png").exists():
            lines += [f"![{model}](results_{model}.png)", ""]
        planned = tuple(itertools.product(args.scratch_speedups, args.allocations))
        lines += _scratch.table(
            model, scratch_rows, rows, bases[model], args.ft_steps, planned if args.scratch else ()
        )
    lines += _flows(path.parent)
    path.write_text("\n".join(lines), encoding="utf-8")


#: Pages of other flows in sub-folders of the out-dir, summarised at the end of its table:
#: (folder, title, the command that writes it).
FLOWS = (
    (
        "iterative",
        "Iterative pruning against one shot, at the same fine-tuning budget",
        "--schedule oneshot,iterative:2,iterative:4",
    ),
    (
        "scan_allocation",
        "Li et al.'s sensitivity scan against the auto and uniform splits",
        "--allocations uniform,auto,scan",
    ),
)


def _flows(folder: Path) -> list[str]:
    """A summary of each :data:`FLOWS` page found under ``folder``: top-1 after
    fine-tuning (loss against the original in points), one row per model, target and
    re-fit, one column per schedule or allocation."""
    out = []
    for sub, title, how in FLOWS:
        rows = [r for r in _load_rows(folder / sub / RESULTS) if "train" not in r]
        if not rows:
            continue
        column = _schedule if sub == "iterative" else _alloc
        columns = list(dict.fromkeys(column(r) for r in rows))
        by = {(r["model"], r["target"], r["reconstruct"], column(r)): r for r in rows}
        out += [
            f"### {title}",
            "",
            f"From [`{sub}/results.md`]({sub}/results.md) (`scripts/reproduce.py {how}`, "
            f"`--out-dir docs/{sub}`; its settings and every run there). Each cell: top-1 "
            "after fine-tuning (loss against the original, points).",
            "",
            "| model | FLOPs | reconstruct | " + " | ".join(columns) + " |",
            "|---|---:|---|" + "---:|" * len(columns),
        ]
        for model, target, rec in sorted(
            {(r["model"], r["target"], r["reconstruct"]) for r in rows}
        ):
            cells = []
            for c in columns:
                r = by.get((model, target, rec, c))
                acc = None if r is None else r.get("acc_ft")
                base = None if r is None else r.get("acc_original")
                cells.append("" if acc is None else f"{_pct(acc)} ({100 * (base - acc):.2f})")
            out.append(f"| {model} | {target:g}× | {rec} | " + " | ".join(cells) + " |")
        out += ["", *_versus(by, columns), ""]
    return out


def _versus(by: dict[tuple, dict[str, Any]], columns: list[str]) -> list[str]:
    """Each column against the first ones (one-shot; uniform and auto): the differences
    of top-1 after fine-tuning in points, and how many are beyond :data:`NOISE`."""
    cells = sorted({k[:3] for k in by})
    bases = columns[:1] if columns[:1] == [ONESHOT] else [c for c in columns if c != SCAN]
    lines = []
    for col in columns:
        for base in bases:
            if col == base or col in bases:
                continue
            diffs = [
                (f"{m.removesuffix('_fmnist')} {t:g}× {rec}", 100 * (a["acc_ft"] - b["acc_ft"]))
                for m, t, rec in cells
                if (a := by.get((m, t, rec, col))) is not None
                and (b := by.get((m, t, rec, base))) is not None
                and a.get("acc_ft") is not None
                and b.get("acc_ft") is not None
            ]
            if not diffs:
                continue
            ahead = sum(d > NOISE for _, d in diffs)
            behind = sum(d < -NOISE for _, d in diffs)
            lines.append(
                f"- {col} − {base}, points after fine-tuning: "
                + ", ".join(f"{w} {d:+.2f}" for w, d in diffs)
                + f". Ahead by more than {NOISE} point in {ahead}, behind by more in {behind}, "
                f"within {NOISE} in {len(diffs) - ahead - behind} of {len(diffs)} cells."
            )
    return lines


# --------------------------------------------------------------------------- main


def _init_distributed(args: argparse.Namespace) -> tuple[int, int, bool]:
    """Join the process group ``torchrun`` describes: ``(rank, world, whether we made it)``.

    See :func:`recon.distributed.join_torchrun`: nothing happens outside ``torchrun``,
    a group the caller already made is used as it is, ``nccl`` with a CUDA ``--device``.
    """
    args.device, owned = join_torchrun(args.device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), owned
    return 0, 1, owned


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _resolve(args, parser)
    rank, world, owned = _init_distributed(args)
    ok = False
    try:
        code = _reproduce(parser, argv, args, rank, world)
        ok = True
        return code
    finally:
        leave_torchrun(owned, ok)


def _reproduce(
    parser: argparse.ArgumentParser,
    argv: list[str],
    args: argparse.Namespace,
    rank: int,
    world: int,
) -> int:
    """Every run on every process; only rank 0 (``lead``) prints and writes files."""
    t_start = time.perf_counter()
    lead = rank == 0
    say = print if lead else lambda *a, **k: None
    args.world = world

    shipped = pretrained_names()
    models = []
    for name in args.models:
        if name in shipped:
            models.append(name)
        else:
            say(f"skipping {name!r}: not a shipped model (shipped: {', '.join(shipped)})")
    if not models:
        parser.error(f"argument --models: none of {args.models} is shipped ({shipped}).")

    results = args.out_dir / RESULTS
    if args.table_only:
        args.resume = True
    old = []
    if lead:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        old = _load_rows(results) if args.resume else []
        if not args.resume:
            results.write_text("", encoding="utf-8")
    if world > 1:  # every process makes the runs rank 0 has not done yet
        box = [old]
        dist.broadcast_object_list(box, src=0)
        old = box[0]
    done = {_key(r): r for r in old if "train" not in r}
    done_scratch = {_scratch.key(r): r for r in old if "train" in r}

    torch.manual_seed(args.seed)
    data = _Data(args.seed, args.n_test)
    nets, bases = {}, {}
    for name in list(models):
        try:
            nets[name] = pretrained(name).to(args.device)
        except FileNotFoundError as exc:
            say(f"skipping {name!r}: {exc}")
            models.remove(name)
            continue
        bases[name] = evaluate(nets[name], *data.test)
        say(f"{name}: original accuracy {_pct(bases[name])}")
    if not models:
        say("no model to prune", file=sys.stderr)
        return 1

    settings = _settings(args)
    runs, rows = [], []
    for model in models:
        for target in _speedups_of(model, args):
            for method, rec, alloc, schedule in itertools.product(
                args.methods, args.reconstruct, args.allocations, args.schedule
            ):
                what = {"model": model, "target": target, "method": method, "reconstruct": rec}
                what |= {"allocation": alloc, "schedule": schedule}
                key = _key(what | _min_keep(alloc, args) | _scan_settings(alloc, args) | settings)
                if key in done:
                    rows.append(done[key])
                else:
                    runs.append((model, target, method, rec, alloc, schedule))
    for model in models:
        for target, kind, alloc in itertools.product(
            args.scratch_speedups, args.scratch, args.allocations
        ):
            what = {"model": model, "target": target, "allocation": alloc, "train": kind}
            key = _scratch.key(what | settings | {"scale": args.scratch_scale})
            if key in done_scratch:
                rows.append(done_scratch[key])
            else:
                runs.append((model, target, kind, "", alloc, ONESHOT))
    if len(rows):
        say(f"resuming: {len(rows)} runs already in {results}, {len(runs)} to go")
    args.missing = len(runs) if args.table_only else 0
    if args.table_only:
        runs = []

    args.scans = _Scans(args, data, say)
    bar = progress_bar(runs, desc="runs", unit="run", disable=not lead)
    for model, target, method, rec, alloc, schedule in bar:
        bar.set_postfix_str(f"{model} {target:g}x {method}/{rec}/{alloc}/{schedule}")
        if method in _scratch.KINDS:
            row = _scratch.run(nets[model], data, args, model, target, method, alloc)
        else:
            row = _run(nets[model], data, args, model, target, method, rec, alloc, schedule)
        row["acc_original"] = bases[model]
        row["processes"] = world  # fine-tuning with BatchNorm depends on it
        checkpoint = row.pop("_checkpoint", None)
        rows.append(row)
        if not lead:
            continue
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if checkpoint is not None:  # the row is written: its rounds are not needed again
            Path(checkpoint).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the folder, once no run has a file there
                Path(checkpoint).parent.rmdir()
        if method in _scratch.KINDS:
            bar.write(
                f"{model} {target:g}x {_scratch.LABELS[method]:>9} ({alloc}) "
                f"{row['epochs']:.3g} epochs: acc {_pct(row['acc'])} "
                f"({row['train_seconds']:.0f} s)"
            )
            continue
        bar.write(
            f"{model} {target:g}x {method:>12}/{rec:<5}/{_variant(row):<7} "
            f"speed-up {row['speedup']:.2f}x  "
            f"acc {_pct(row['acc'])}"
            + (f" / {_pct(row['acc_ft'])} after FT  " if args.ft_steps else "  ")
            + f"({row['prune_seconds']:.1f} s + {row['ft_seconds'] or 0:.1f} s)"
        )
    bar.close()
    topup = [r for r in rows if _recovers(r, args)]  # resumed rows without the recovery
    for row in progress_bar(topup, desc="recovering", unit="run", disable=not lead):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same run as the row's: warned there
            res = _prune(
                nets[row["model"]], data, args, row["target"], row["method"],
                row["reconstruct"], _alloc(row), row["model"],
            )  # fmt: skip
        row.update(_recovery(nets[row["model"]], res, data, args))
        say(
            f"{row['model']} {row['target']:g}x {row['method']}/{_alloc(row)}: one-shot "
            f"{_pct(row['acc'])}, recovered {_pct(row['acc_rec'])} ({row['rec_seconds']:.0f} s)"
        )
    if not lead:
        return 0
    if topup:  # the file again: its rows (the recovered ones updated), then this run's
        known = {id(r) for r in old}
        every = old + [r for r in rows if id(r) not in known]
        results.write_text(
            "".join(json.dumps(r, allow_nan=False) + "\n" for r in every), encoding="utf-8"
        )

    for model in models:
        _plot(
            model,
            [r for r in rows if r["model"] == model and "train" not in r and _oneshot(r)],
            bases[model],
            args.out_dir / f"results_{model}.png",
            args,
        )
    _write_markdown(
        args.out_dir / TABLE, argv, args, models, bases, rows, time.perf_counter() - t_start
    )
    print(f"wrote {results}, {args.out_dir / TABLE} and the plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
