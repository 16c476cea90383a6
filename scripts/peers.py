"""Compare recon with Torch-Pruning on the shipped Fashion-MNIST models at equal FLOPs.

For each model and FLOPs speed-up: prune with recon's defaults, and with Torch-Pruning
(``MetaPruner``; L2 magnitude, BatchNorm scale, Taylor and LAMP importance, uniform and
global), its channel ratio found by bisection so that its pruned model's FLOPs match the
target within ``--tol``. Both tools get the same calibration images; both final models
are counted by the same counter (``recon.budget.count_flops``: ``FlopCounterMode`` on
one forward pass), with Torch-Pruning's own counter beside it (recon's sampler layers
registered). Each pruned model is measured on the test split one-shot and after
re-estimating its BatchNorm statistics on the calibration images; then recon's model
and the best Torch-Pruning configuration of each cell (by accuracy after re-estimation)
are fine-tuned with labels for the same steps (``recon.finetune`` defaults).

One JSON line per result in ``<out-dir>/peers.jsonl`` as it ends (``--resume`` skips
those already there); ``<out-dir>/peers.md`` is regenerated from it after each line.

    pip install -e '.[compare]'
    nice -n 10 python scripts/peers.py --resume            # docs/peers.md (CPU hours)
    python scripts/peers.py --quick --out-dir /tmp/peers    # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import recon
from recon.budget import count_flops, count_params
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.finetune import finetune
from recon.layers import SampledConv2d, Sampler
from recon.models import pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _args
from _measure import reestimate_bn

MODELS = ("vgg16_fmnist", "resnet20_fmnist", "mobilenetv2_fmnist")
CRITERIA = ("l2", "bn_scale", "taylor", "lamp")
SCOPES = ("uniform", "global")
TITLE = "# recon and Torch-Pruning"


# --------------------------------------------------------------------------- FLOPs matching


def match_ratio(
    speedup_at: Callable[[float], float],
    target: float,
    *,
    tol: float = 0.02,
    hi: float = 0.99,
    iters: int = 30,
) -> tuple[float, float]:
    """Bisect a pruning ratio ``r`` in ``[0, hi]`` until ``speedup_at(r)`` is ``target``.

    ``speedup_at`` (the FLOPs ratio original / pruned of the model pruned at ``r``) must
    be non-decreasing in ``r``; it may be a step function (whole channels). Stops at the
    first ``r`` with ``|speedup_at(r) / target - 1| <= tol``.

    Returns
    -------
    ratio, speedup : float
        The ratio and its speed-up; when no tried ratio is within ``tol`` (a step of the
        function jumps over the band, or ``hi`` is not enough), the tried one closest to
        ``target`` (relative error).
    """
    if not target >= 1:
        raise ValueError(f"The 'target' parameter must be a float >= 1. Got {target!r} instead.")
    best: tuple[float, float, float] | None = None  # (relative error, ratio, speed-up)
    lo, up = 0.0, hi
    for _ in range(iters):
        r = (lo + up) / 2
        s = speedup_at(r)
        err = abs(s / target - 1) if math.isfinite(s) else math.inf
        if best is None or err < best[0]:
            best = (err, r, s)
        if err <= tol:
            break
        if s < target:
            lo = r
        else:
            up = r
    assert best is not None
    return best[1], best[2]


# --------------------------------------------------------------------------- counting


def flops(model: nn.Module) -> int:
    """FLOPs of one 1x32x32 image: ``FlopCounterMode`` (2 per multiply-accumulate of
    convolutions and matrix products; index_select gathers count 0)."""
    return count_flops(model, torch.zeros(1, 1, 32, 32))[0]


def tp_macs(model: nn.Module) -> int:
    """Torch-Pruning's own counter (multiply-accumulates plus BN, ReLU, pooling and bias
    ops), with recon's layers registered: it keys its hooks on the exact module type, so
    a ``SampledConv2d`` would count as zero; a ``Sampler`` is a gather (0)."""
    import torch_pruning as tp
    from torch_pruning.utils import op_counter

    # count_ops_and_params empties this mapping after every call
    op_counter.CUSTOM_MODULES_MAPPING[SampledConv2d] = op_counter.conv_flops_counter_hook
    op_counter.CUSTOM_MODULES_MAPPING[Sampler] = op_counter.empty_flops_counter_hook
    macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, 1, 32, 32))
    return int(macs)


# --------------------------------------------------------------------------- Torch-Pruning


def _importance(criterion: str):
    import torch_pruning as tp

    return {
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "bn_scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.TaylorImportance,
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
    }[criterion]()


def _classifier(model: nn.Module) -> nn.Module:
    """The last ``nn.Linear``: Torch-Pruning must not prune the logits."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def loss_grads(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 100) -> dict[str, Tensor]:
    """Gradients of the mean cross-entropy on ``(x, y)`` (eval mode), for Taylor."""
    net = copy.deepcopy(model).eval()
    net.zero_grad()
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        (F.cross_entropy(net(xb), yb, reduction="sum") / len(y)).backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def tp_prune(
    model: nn.Module,
    criterion: str,
    scope: str,
    ratio: float,
    grads: dict[str, Tensor] | None = None,
) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning's ``MetaPruner`` at channel ratio
    ``ratio`` in one step; ``grads`` (from :func:`loss_grads`) for Taylor."""
    import torch_pruning as tp

    net = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(
        net,
        torch.zeros(1, 1, 32, 32),
        importance=_importance(criterion),
        global_pruning=scope == "global",
        pruning_ratio=ratio,
        ignored_layers=[_classifier(net)],
    )
    if criterion == "taylor":
        for n, p in net.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
    pruner.step()
    net.zero_grad(set_to_none=True)
    return net.eval()


# --------------------------------------------------------------------------- runs


def _key(row: dict[str, Any]) -> tuple:
    return (
        row["stage"],
        row["model"],
        row["speedup"],
        row["tool"],
        row["criterion"],
        row["scope"],
        row.get("steps"),
    )


def _load_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a run killed while writing its line
                continue
    return rows


class _Run:
    """Data, results on file and the cached pieces one model needs."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args, self.argv = args, argv
        self.jsonl = args.out_dir / "peers.jsonl"
        rows = _load_rows(self.jsonl) if args.resume else []
        if not args.resume and self.jsonl.exists():
            self.jsonl.unlink()
        self.rows = rows
        self.done = {_key(r) for r in rows}
        images, labels = load_fashion_mnist("train")
        self.x_train, self.y_train = to_tensor32(images), torch.from_numpy(labels).long()
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(self.y_train), generator=g)[: args.calib]
        self.x_cal, self.y_cal = self.x_train[idx], self.y_train[idx]  # (n, 1, 32, 32)
        images, labels = load_fashion_mnist("test")
        self.x_test = to_tensor32(images)[: args.test]
        self.y_test = torch.from_numpy(labels).long()[: args.test]
        self._grads: dict[str, tuple[dict[str, Tensor], float]] = {}
        self._base: dict[str, dict[str, float]] = {}

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.done.add(_key(row))
        with self.jsonl.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        write_page(self.rows, self.args.out_dir / "peers.md", self.argv, self.args)

    def base(self, name: str, net: nn.Module) -> dict[str, float]:
        if name not in self._base:
            self._base[name] = {
                "flops": flops(net),
                "tp_macs": tp_macs(net),
                "params": count_params(net),
                "acc": evaluate(net, self.x_test, self.y_test),
            }
        return self._base[name]

    def grads(self, name: str, net: nn.Module) -> tuple[dict[str, Tensor], float]:
        """Taylor's gradients on the calibration images, and the seconds they took."""
        if name not in self._grads:
            t0 = time.perf_counter()
            grads = loss_grads(net, self.x_cal, self.y_cal)
            self._grads[name] = grads, time.perf_counter() - t0
        return self._grads[name]

    def bn(self, net: nn.Module) -> nn.Module:
        """A copy with BatchNorm statistics re-estimated on the calibration images."""
        return reestimate_bn(copy.deepcopy(net), self.x_cal.split(100))

    # ---- pruning

    def recon(self, name: str, net: nn.Module, s: float) -> tuple[nn.Module, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            res = recon.prune(net, self.x_cal, speedup=s, seed=self.args.seed, progress=False)
        return res.model.eval(), time.perf_counter() - t0

    def torch_pruning(
        self,
        name: str,
        net: nn.Module,
        s: float,
        criterion: str,
        scope: str,
        ratio: float | None = None,
    ) -> tuple[nn.Module, float, float, int]:
        """(model, seconds of the prune at the found ratio, ratio, bisection steps)."""
        grads, t_grads = self.grads(name, net) if criterion == "taylor" else (None, 0.0)
        base = self.base(name, net)["flops"]
        models: dict[float, tuple[nn.Module, float]] = {}

        def speedup_at(r: float) -> float:
            t0 = time.perf_counter()
            m = tp_prune(net, criterion, scope, r, grads)
            models[r] = (m, time.perf_counter() - t0)
            return base / flops(m)

        if ratio is None:
            ratio, _ = match_ratio(speedup_at, s, tol=self.args.tol)
        else:
            speedup_at(ratio)
        m, t = models[ratio]
        return m, t + t_grads, ratio, len(models)

    def prune(
        self,
        name: str,
        net: nn.Module,
        s: float,
        tool: str,
        criterion: str,
        scope: str,
        ratio: float | None = None,
    ) -> tuple[nn.Module, dict[str, Any]]:
        if tool == "recon":
            m, t = self.recon(name, net, s)
            extra: dict[str, Any] = {}
        else:
            m, t, ratio, n = self.torch_pruning(name, net, s, criterion, scope, ratio)
            extra = {"ratio": ratio, "bisection_prunes": n}
        return m, {"prune_seconds": t, **extra}

    def oneshot(
        self, name: str, s: float, tool: str, criterion: str, scope: str, uniform_ratio: dict
    ) -> None:
        row = {
            "stage": "prune",
            "model": name,
            "speedup": s,
            "tool": tool,
            "criterion": criterion,
            "scope": scope,
        }
        if _key(row) in self.done:
            return
        net = pretrained(name).eval()
        base = self.base(name, net)
        ratio = uniform_ratio.get((name, s)) if scope == "uniform" else None
        try:
            m, info = self.prune(name, net, s, tool, criterion, scope, ratio)
        except Exception as exc:  # a configuration Torch-Pruning cannot prune: say so
            self.add({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{name} {s:g}x {tool} {criterion} {scope}: {exc}", flush=True)
            return
        if tool != "recon" and scope == "uniform":
            uniform_ratio[(name, s)] = info["ratio"]  # channel counts do not depend on it
        acc = evaluate(m, self.x_test, self.y_test)
        acc_bn = evaluate(self.bn(m), self.x_test, self.y_test)
        f = flops(m)
        row.update(info)
        row.update(
            {
                "base_acc": base["acc"],
                "flops": f,
                "base_flops": base["flops"],
                "flops_speedup": base["flops"] / f,
                "tp_speedup": base["tp_macs"] / tp_macs(m),
                "params": count_params(m),
                "base_params": base["params"],
                "oneshot": acc,
                "bn": acc_bn,
                "calib": self.args.calib,
                "test": len(self.y_test),
                "seed": self.args.seed,
            }
        )
        self.add(row)
        print(
            f"{name} {s:g}x {tool} {criterion} {scope}: {f / 1e6:.2f} MFLOPs "
            f"({row['flops_speedup']:.2f}x), one-shot {100 * acc:.2f}, "
            f"BN {100 * acc_bn:.2f} ({info['prune_seconds']:.1f} s)",
            flush=True,
        )

    def tune(self, name: str, s: float, steps: int) -> None:
        """Fine-tune recon's model and the best Torch-Pruning one of a cell."""
        picks = _picks(self.rows, name, s)
        net = pretrained(name).eval()
        for p in picks:
            row = {
                "stage": "finetune",
                "model": name,
                "speedup": s,
                "tool": p["tool"],
                "criterion": p["criterion"],
                "scope": p["scope"],
                "steps": steps,
            }
            if _key(row) in self.done:
                continue
            m, _ = self.prune(name, net, s, p["tool"], p["criterion"], p["scope"], p.get("ratio"))
            m = self.bn(m)
            again = evaluate(m, self.x_test, self.y_test)
            t0 = time.perf_counter()
            finetune(
                m, self.x_train, self.y_train, steps=steps, seed=self.args.seed, progress=False
            )
            t = time.perf_counter() - t0
            acc = evaluate(m, self.x_test, self.y_test)
            row.update({"acc": acc, "start": again, "finetune_seconds": t})
            self.add(row)
            print(
                f"{name} {s:g}x {p['tool']} {p['criterion']} {p['scope']} + {steps} steps: "
                f"{100 * again:.2f} -> {100 * acc:.2f} ({t:.0f} s)",
                flush=True,
            )


def _picks(rows: list[dict[str, Any]], name: str, s: float) -> list[dict[str, Any]]:
    """A cell's recon row and its best Torch-Pruning row after BN re-estimation."""
    cell = [
        r
        for r in rows
        if r["stage"] == "prune" and (r["model"], r["speedup"]) == (name, s) and "error" not in r
    ]
    peers = [r for r in cell if r["tool"] != "recon"]
    best = [max(peers, key=lambda r: r["bn"])] if peers else []
    return [r for r in cell if r["tool"] == "recon"] + best


def _cells_by_cost(rows: list[dict[str, Any]], cells: list[tuple[str, float]]) -> list[tuple]:
    """Cheapest first: by the seconds its shortest fine-tuning took, else by FLOPs."""

    def cost(cell: tuple[str, float]) -> tuple[float, float]:
        tuned = [r for r in rows if r["stage"] == "finetune" and (r["model"], r["speedup"]) == cell]
        least = min((r["steps"] for r in tuned), default=None)
        seconds = sum(r["finetune_seconds"] / r["steps"] for r in tuned if r["steps"] == least)
        found = [
            r["flops"]
            for r in rows
            if r["stage"] == "prune" and "flops" in r and (r["model"], r["speedup"]) == cell
        ]
        return (seconds if tuned else math.inf, max(found, default=0))

    return sorted(cells, key=cost)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("docs"))
    p.add_argument("--models", type=_args.names(MODELS, "models"), default=MODELS)
    p.add_argument("--speedups", type=_args.ratios("speed-ups", "2,4"), default=(2.0, 4.0))
    p.add_argument("--criteria", type=_args.names(CRITERIA, "criteria"), default=CRITERIA)
    p.add_argument("--scopes", type=_args.names(SCOPES, "scopes"), default=SCOPES)
    p.add_argument(
        "--ft-steps",
        type=_args.ints("fine-tuning steps"),
        default=(300, 3000),
        help="fine-tuning budgets, each over every cell, cheapest cell first (300,3000)",
    )
    p.add_argument(
        "--calib",
        type=_args.int_at_least(1),
        default=1000,
        help="calibration images (1,000, seeded, from the train split)",
    )
    p.add_argument("--test", type=_args.int_at_least(1), default=10000, help="test images")
    p.add_argument("--tol", type=float, default=0.02, help="FLOPs match, relative (0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quick", action="store_true", help="VGG-16 2x, tiny data, seconds")
    p.add_argument(
        "--page-only", action="store_true", help="only rewrite peers.md from peers.jsonl"
    )
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.models, args.speedups, args.ft_steps = ("vgg16_fmnist",), (2.0,), (2,)
        args.calib, args.test = 64, 200
    if args.page_only:
        rows = _load_rows(args.out_dir / "peers.jsonl")
        write_page(rows, args.out_dir / "peers.md", argv, args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(args, argv)
    cells = [(m, s) for m in args.models for s in args.speedups]
    uniform_ratio = {
        (r["model"], r["speedup"]): r["ratio"]
        for r in run.rows
        if r["stage"] == "prune" and r["scope"] == "uniform" and "ratio" in r
    }
    for name, s in cells:
        run.oneshot(name, s, "recon", "obs", "auto", uniform_ratio)
        for scope in args.scopes:
            for criterion in args.criteria:
                run.oneshot(name, s, "torch-pruning", criterion, scope, uniform_ratio)
    for steps in args.ft_steps:
        for name, s in _cells_by_cost(run.rows, cells):
            run.tune(name, s, steps)
    write_page(run.rows, args.out_dir / "peers.md", argv, args)


# --------------------------------------------------------------------------- the page


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _name(r: dict[str, Any]) -> str:
    if r["tool"] == "recon":
        return "recon (defaults)"
    return f"TP {r['criterion'].replace('_', '-')}, {r['scope']}"


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{100 * lo:+.2f}" if lo == hi else f"{100 * lo:+.2f} to {100 * hi:+.2f}"


def _findings(rows: list[dict[str, Any]], cells: list[tuple], steps: list[int]) -> list[str]:
    """What the tables say, in numbers: recon minus Torch-Pruning, in points."""
    pruned = [r for r in rows if r["stage"] == "prune" and "error" not in r]
    out = []
    for key, what in (("oneshot", "One-shot"), ("bn", "After BN re-estimation")):
        gaps = []
        for cell in cells:
            here = [r for r in pruned if (r["model"], r["speedup"]) == cell]
            mine = [r[key] for r in here if r["tool"] == "recon"]
            theirs = [r[key] for r in here if r["tool"] != "recon"]
            if mine and theirs:
                gaps.append(mine[0] - max(theirs))
        if gaps:
            out.append(
                f"- {what}: recon is ahead of the best Torch-Pruning configuration in "
                f"{sum(g > 0 for g in gaps)} of {len(gaps)} cells, by {_span(gaps)} points."
            )
    mine = [r["bn"] - r["oneshot"] for r in pruned if r["tool"] == "recon"]
    theirs = [r["bn"] - r["oneshot"] for r in pruned if r["tool"] != "recon"]
    if mine and theirs:
        out.append(
            f"- BN re-estimation changes recon's accuracy by {_span(mine)} points, "
            f"Torch-Pruning's by {_span(theirs)} points."
        )
    for n in steps:
        gaps, done = [], []
        for name, s in cells:
            got = {
                r["tool"]: r["acc"]
                for r in rows
                if r["stage"] == "finetune"
                and (r["model"], r["speedup"], r["steps"]) == (name, s, n)
            }
            if len(got) == 2:
                gaps.append(got["recon"] - got["torch-pruning"])
                done.append(f"{name} {s:g}×")
        if not gaps:
            out.append(f"- Fine-tuning for {n:,} steps: not run yet (compute).")
        else:
            missing = len(cells) - len(gaps)
            only = f" (run for {', '.join(done)} only; the other {missing} did not fit the compute)"
            out.append(
                f"- Fine-tuned for {n:,} steps: recon is ahead in {sum(g > 0 for g in gaps)} "
                f"of {len(gaps)} cells, by {_span(gaps)} points{only if missing else ''}."
            )
        worse = [
            f"{_name(r)} on {r['model']} {r['speedup']:g}× ({_pct(r['start'])} → {_pct(r['acc'])})"
            for r in rows
            if r["stage"] == "finetune" and r["steps"] == n and r["acc"] < r["start"]
        ]
        if worse:
            out.append(
                f"- {n:,} steps of fine-tuning lowered the accuracy of " + "; ".join(worse) + "."
            )
    return out


def write_page(rows: list[dict[str, Any]], md: Path, argv: list[str], args) -> None:
    import torch_pruning as tp

    argv = [a for a in argv if a not in ("--resume", "--page-only")]
    cmd = "nice -n 10 python scripts/peers.py " + shlex.join(argv)
    pruned = [r for r in rows if r["stage"] == "prune"]
    tuned = {
        (r["model"], r["speedup"], r["tool"], r["criterion"], r["scope"], r["steps"]): r
        for r in rows
        if r["stage"] == "finetune"
    }
    steps = sorted({k[-1] for k in tuned})
    try:
        tp_version = __import__("importlib.metadata").metadata.version("torch-pruning")
    except Exception:
        tp_version = getattr(tp, "__version__", "?")
    out = [
        TITLE,
        "",
        "recon against [Torch-Pruning](https://github.com/VainF/Torch-Pruning) "
        f"{tp_version}, a widely used structured-pruning library for PyTorch, on the three "
        "models shipped with recon (trained on Fashion-MNIST, `recon.models.pretrained`), "
        "at the same FLOPs, from the same calibration images, measured the same way.",
        "",
        "## How it was measured",
        "",
        f"- Command: `{cmd.strip()}` (resumable; each result is a line of `peers.jsonl`, "
        "this page is regenerated from it).",
        f"- Machine: {platform.machine()} CPU, {args.threads} torch thread(s), shared with "
        f"other jobs (times are indicative); Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch-pruning {tp_version}.",
        f"- Data: Fashion-MNIST (28x28 padded to 32x32). Calibration: {args.calib:,} "
        f"train images drawn with seed {args.seed}, the same for both tools (and their "
        f"labels for Torch-Pruning's Taylor criterion). Top-1 on the first {args.test:,} "
        "test images.",
        "- Models: "
        + ", ".join(
            f"`{m}` ({base['base_flops'] / 1e6:.1f} MFLOPs, {base['base_params']:,} parameters, "
            f"{_pct(base['base_acc'])} %)"
            for m, base in {r["model"]: r for r in pruned if "error" not in r}.items()
        )
        + " (`recon.models.pretrained_names()`; VGG-16 at a quarter of its width, "
        "MobileNetV2 at half).",
        "- FLOPs: one counter for both final models, `recon.budget.count_flops` "
        "(`torch.utils.flop_counter.FlopCounterMode` on one forward pass of a 1x32x32 "
        "image: 2 FLOPs per multiply-accumulate of convolutions and linear layers; "
        "BatchNorm, ReLU, pooling and additions are not counted; the index-select of "
        "recon's sampler layers is a gather and counts 0). *Speed-up* is the original's "
        "FLOPs over the pruned model's. *TP counter* is the same ratio by Torch-Pruning's "
        "`tp.utils.count_ops_and_params` (multiply-accumulates plus BatchNorm, ReLU, "
        "pooling and bias), with recon's `SampledConv2d` registered as a convolution "
        "(unregistered it counts as 0, since the counter keys on the exact module type) "
        "and `Sampler` as 0.",
        "- recon: `recon.prune(model, calib, speedup=s, seed=0)`, its defaults (OBS "
        "selection, automatic allocation, least-squares re-fit).",
        "- Torch-Pruning: `tp.pruner.MetaPruner(model, example, importance, "
        "global_pruning=..., pruning_ratio=r, ignored_layers=[classifier])`, one "
        "`pruner.step()` (iterative_steps=1), other arguments at their defaults. "
        "Importance: `MagnitudeImportance(p=2)` (L2), `BNScaleImportance()`, "
        "`TaylorImportance()` and `LAMPImportance(p=2)`. **Taylor needs labels**: its "
        "scores use the gradients of the cross-entropy on the calibration images and "
        "their labels, which recon and the other criteria never see. *uniform*: every "
        "layer loses the same share of channels (`global_pruning=False`); *global*: one "
        "threshold over all layers (`global_pruning=True`). The channel ratio `r` is "
        f"found by bisection until the pruned model's FLOPs speed-up is within "
        f"{100 * args.tol:g} % of the target (the closest tried ratio where whole "
        "channels step over the band).",
        "- *Prune (s)*: one pruning at the chosen setting (for Taylor including the "
        "gradient pass; not the bisection, which costs about as many prunes as the "
        "*search* column says).",
        "- *BN*: BatchNorm running statistics re-estimated (plain average) on the "
        "calibration images, batches of 100, for both tools; each BatchNorm's own "
        "momentum is set back afterwards, so fine-tuning updates the statistics as in "
        "training.",
        "- *Fine-tuned*: `recon.finetune(model, x_train, y_train, steps=n, seed=0)` "
        "with its defaults (SGD, momentum 0.9, lr 0.01 cosine to 0, batch 128, weight "
        "decay 5e-4, shifts and flips) on the 60,000 labelled train images, starting "
        "from the BN-re-estimated model, the same for both tools. To fit the compute, "
        "only recon and the best Torch-Pruning configuration of each cell (highest "
        "accuracy after BN re-estimation) are fine-tuned.",
        "",
    ]
    cells = list(dict.fromkeys((r["model"], r["speedup"]) for r in pruned))
    if cells:
        out += [
            "## Summary",
            "",
            "recon against the best Torch-Pruning configuration of each cell (by "
            "accuracy after BN re-estimation). Top-1 in %.",
            "",
        ]
        head = "| model (original) | speed-up | tool | one-shot | BN |"
        head += "".join(f" fine-tuned {n:,} |" for n in steps)
        out += [head, "|---|---|---|---:|---:|" + "---:|" * len(steps)]
        for name, s in cells:
            for r in _picks(rows, name, s):
                ft = "".join(
                    " "
                    + _pct(
                        tuned.get((name, s, r["tool"], r["criterion"], r["scope"], n), {}).get(
                            "acc"
                        )
                    )
                    + " |"
                    for n in steps
                )
                out.append(
                    f"| {name} ({_pct(r['base_acc'])}) | {s:g}× | {_name(r)} | "
                    f"{_pct(r['oneshot'])} | {_pct(r['bn'])} |{ft}"
                )
        wanted = sorted(set(steps) | set(args.ft_steps))
        out += ["", *_findings(rows, cells, wanted)]
        out += [
            "",
            "## Every configuration",
            "",
            "| model | target | method | speed-up | TP counter | params | ratio | "
            "search | prune (s) | one-shot | BN |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in pruned:
            if "error" in r:
                out.append(
                    f"| {r['model']} | {r['speedup']:g}× | {_name(r)} | "
                    f"failed: {r['error']} ||||||||"
                )
                continue
            ratio = f"{r['ratio']:.3f}" if "ratio" in r else "–"
            search = str(r.get("bisection_prunes", "–"))
            out.append(
                f"| {r['model']} | {r['speedup']:g}× | {_name(r)} | "
                f"{r['flops_speedup']:.2f}× | {r['tp_speedup']:.2f}× | "
                f"{r['params'] / r['base_params']:.2f} | {ratio} | {search} | "
                f"{r['prune_seconds']:.2f} | {_pct(r['oneshot'])} | {_pct(r['bn'])} |"
            )
        out += [
            "",
            "*params*: parameters kept (fraction of the original). *ratio*: "
            "Torch-Pruning's `pruning_ratio`. *search*: prunes the bisection tried "
            "(uniform configurations reuse the L2 search: their channel counts do not "
            "depend on the criterion).",
        ]
    if tuned:
        out += [
            "",
            "## Fine-tuning runs",
            "",
            "| model | target | method | steps | start (BN) | fine-tuned | time (s) |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in (r for r in rows if r["stage"] == "finetune"):
            out.append(
                f"| {r['model']} | {r['speedup']:g}× | {_name(r)} | {r['steps']:,} | "
                f"{_pct(r['start'])} | {_pct(r['acc'])} | "
                f"{r['finetune_seconds']:.0f} |"
            )
    md.write_text("\n".join(out) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
