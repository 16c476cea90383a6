"""Rethinking's scratch baselines and the channel-level lottery ticket, for reproduce.py.

For a shipped model and a FLOPs target, the LASSO + least-squares pruned architecture
(the one ``reproduce.py``'s rows measure) is trained again from the start with the
recipe that trained the original (``recon/assets/pretrained.json``: epochs, batch,
learning rate, seed; ``recon.finetune.finetune``: SGD, momentum 0.9, weight decay
5e-4, cosine schedule, shifts and flips):

- ``scratch_e`` (Scratch-E, Liu et al. 2019): fresh weights drawn by the
  architecture's own scheme (``recon.reinit(..., init=Model.init_weights)``), the
  original's number of epochs;
- ``scratch_b`` (Scratch-B): the same start, epochs scaled by the measured FLOPs
  ratio so that training costs the original's FLOPs, capped at 2x the epochs as in
  the paper;
- ``ticket`` (Frankle & Carbin 2019, at the channel level): the original model's own
  initial weights (its builder under its training seed, as ``scripts/train.py`` made
  them) cut to the kept channels by ``recon.apply_plan``, the original's epochs.

``scale`` multiplies every epoch count (``reproduce.py --scratch-scale``; ``--quick``
trains a few steps).

Each training saves its state every ``CHECKPOINT_EVERY`` steps to
``<out-dir>/checkpoints/`` (``recon.finetune(checkpoint=...)``): a run interrupted
(a stopped session, a killed job) continues where it was with ``reproduce.py
--resume``, to the accuracy an uninterrupted run gives (the row's ``train_resumed``
is then true and its ``train_seconds`` count the last process only). The file is
deleted once its row is made.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import recon
from recon import models
from recon.data import evaluate
from recon.finetune import finetune

KINDS = ("scratch_e", "scratch_b", "ticket")
LABELS = {"scratch_e": "Scratch-E", "scratch_b": "Scratch-B", "ticket": "ticket"}
SPEEDUPS = (2.0, 4.0)
TRAIN_IMAGES = 60_000  # the Fashion-MNIST train split
B_CAP = 2.0  # Scratch-B trains at most 2x the epochs (Liu et al. 2019)
CHECKPOINT_EVERY = 400  # steps: about a minute of the shipped models' training here


def recipe(name: str) -> dict[str, Any]:
    """How the shipped model ``name`` was trained (its manifest entry)."""
    entry = models._manifest()[name]
    for key in ("builder", "kwargs", "seed", "epochs", "batch_size", "lr"):
        if key not in entry:
            raise KeyError(f"{name}: the manifest entry has no {key!r}: cannot retrain it")
    return entry


def original_init(name: str) -> nn.Module:
    """The shipped model's weights before training: its builder under its seed."""
    entry = recipe(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry["seed"])
        return getattr(models, entry["builder"])(**entry["kwargs"])


def key(row: dict[str, Any]) -> tuple:
    return tuple(
        row[k]
        for k in ("model", "target", "allocation", "train", "calib", "n_test", "seed", "scale")
    )


_PRUNED: dict[tuple, Any] = {}  # the latest pruned architecture, shared by its kinds


def _prune(net, data, args, target: float, allocation: str):
    key = (id(net), target, allocation, args.calib, args.seed, str(args.device))
    if key not in _PRUNED:
        _PRUNED.clear()
        _PRUNED[key] = _prune_now(net, data, args, target, allocation)
    return _PRUNED[key]


def _prune_now(net, data, args, target: float, allocation: str):
    return recon.prune(
        net,
        data.calib(args.calib).split(100),
        method="lasso",
        reconstruct="lstsq",
        speedup=target,
        allocation=allocation,
        seed=args.seed,
        device=args.device,
        progress=False,
    )


def run(
    net: nn.Module,
    data,
    args: argparse.Namespace,
    model: str,
    target: float,
    kind: str,
    allocation: str,
) -> dict[str, Any]:
    """Prune ``net`` (LASSO + lstsq) for the architecture, train it as ``kind`` says."""
    if kind not in KINDS:
        raise ValueError(f"The 'kind' argument must be one of {KINDS}. Got {kind!r} instead.")
    entry = recipe(model)
    with warnings.catch_warnings():  # the pruned rows of reproduce.py record them
        warnings.simplefilter("ignore")
        res = _prune(net, data, args, target, allocation)
    speedup = float(res.report.speedup)
    if kind == "ticket":
        start = recon.apply_plan(original_init(model), res.plan)
    else:
        init = getattr(type(net), "init_weights", None)
        start = recon.reinit(res.model, seed=args.seed, init=init)
    start = start.to(args.device)  # both are new models: res.model stays as it is
    epochs = entry["epochs"] * args.scratch_scale
    if kind == "scratch_b":
        epochs *= min(B_CAP, speedup)
    steps = max(1, round(epochs * (TRAIN_IMAGES // entry["batch_size"])))
    x_train, y_train = data.train
    checkpoint = checkpoint_path(args.out_dir, model, target, kind, allocation, args)
    resumed = checkpoint.exists()
    t0 = time.perf_counter()
    finetune(
        start,
        x_train,
        y_train,
        steps=steps,
        lr=entry["lr"],
        batch_size=entry["batch_size"],
        seed=args.seed,
        checkpoint=checkpoint,
        checkpoint_every=CHECKPOINT_EVERY,
        progress=False,
    )
    seconds = time.perf_counter() - t0  # this process's share when resumed
    acc = evaluate(start, *data.test)
    checkpoint.unlink(missing_ok=True)
    return {
        "model": model,
        "target": target,
        "allocation": allocation,
        "train": kind,
        "method": "lasso",
        "reconstruct": "lstsq",
        "calib": args.calib,
        "n_test": args.n_test,
        "seed": args.seed,
        "scale": args.scratch_scale,
        "speedup": speedup,
        "epochs": epochs,
        "steps": steps,
        "lr": entry["lr"],
        "acc": acc,
        "train_seconds": seconds,
        "train_resumed": resumed,
        "channels": res.channels,
    }


def checkpoint_path(
    out_dir: Path, model: str, target: float, kind: str, allocation: str, args
) -> Path:
    """Where the training of one scratch row keeps its state while it runs."""
    name = (
        f"{model}-{target:g}x-{allocation}-{kind}-calib{args.calib}-seed{args.seed}"
        f"-scale{args.scratch_scale:g}"
    )
    return Path(out_dir) / "checkpoints" / f"{name}.pt"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def table(
    model: str,
    rows: list[dict[str, Any]],
    prune_rows: list[dict[str, Any]],
    base: float,
    ft_steps: int,
    planned: tuple[tuple[float, str], ...] = (),
) -> list[str]:
    """The section of results.md for one model: one-shot and fine-tuned pruning beside
    the scratch-trained and ticket-trained same architectures, and what they say;
    ``planned`` (target, allocation) cells not run yet are blank."""
    rows = [r for r in rows if r["model"] == model]
    if not rows and not planned:
        return []
    entry = recipe(model)
    epochs = f"{entry['epochs'] * (rows[0]['scale'] if rows else 1):g}"
    by = {(r["target"], r["allocation"], r["train"]): r for r in rows}
    pruned = {
        (r["target"], r.get("allocation", "uniform")): r
        for r in prune_rows
        if r["model"] == model and (r["method"], r["reconstruct"]) == ("lasso", "lstsq")
    }
    cells = sorted({(r["target"], r["allocation"]) for r in rows} | set(planned))
    lines = [
        f"#### {model}: pruned vs trained from scratch (Rethinking, lottery ticket)",
        "",
        f"Original {_pct(base)} after {entry['epochs']} epochs. The LASSO + lstsq "
        "architecture of each target, as pruned (one-shot; after "
        f"{ft_steps} fine-tuning steps) and trained from the start with the original's "
        f"recipe: Scratch-E ({epochs} epochs, fresh init), Scratch-B (epochs × "
        "the FLOPs ratio, at most 2×), ticket (the original's own initial weights, "
        f"{epochs} epochs).",
        "",
        "| FLOPs | allocation | one-shot | fine-tuned | Scratch-E | Scratch-B | ticket |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    findings = []
    for cell in cells:
        target, alloc = cell
        p = pruned.get((target, alloc), {})
        got = {k: by.get((target, alloc, k), {}).get("acc") for k in KINDS}
        speed = [r["speedup"] for r in rows if (r["target"], r["allocation"]) == cell]
        speed = f" ({speed[0]:.2f}×)" if speed else ""
        lines.append(
            f"| {target:g}×{speed} | {alloc} | {_pct(p.get('acc'))} | "
            f"{_pct(p.get('acc_ft'))} | {_pct(got['scratch_e'])} | {_pct(got['scratch_b'])} | "
            f"{_pct(got['ticket'])} |"
        )
        ft = p.get("acc_ft")
        for what, acc, against, than in (
            ("Scratch-E", got["scratch_e"], ft, "the fine-tuned pruned model"),
            ("Scratch-B", got["scratch_b"], ft, "the fine-tuned pruned model"),
            ("the ticket's init", got["ticket"], got["scratch_e"], "a fresh one at equal epochs"),
        ):
            if acc is not None and against is not None:
                verb = "beats" if acc > against else "does not beat"
                findings.append(
                    f"{target:g}× ({alloc}): {what} {verb} {than} "
                    f"({100 * (acc - against):+.2f} points)"
                )
    lines.append("")
    if findings:
        lines += [
            "One run each (seed 0; a difference under half a point is within noise): "
            + "; ".join(findings)
            + ".",
            "",
        ]
    return lines
