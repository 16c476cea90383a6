"""recon at ImageNet size: pruning time in forward passes, memory, and the latency of
the pruned models. ``python scripts/bench.py scale224`` (also part of ``all``).

torchvision VGG-16 and ResNet-50 with random weights (seeded) whose BatchNorm statistics
are re-estimated on the images, and random 224-px images: timings only, no accuracy.
Each pruning run is a child process of its own (``bench._run_side``), so that peak
memories are not mixed.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from _measure import GROUPS, by_operator, reestimate_bn
from torch import Tensor, nn

import recon
from recon import bench
from recon.cli import load_model

MODELS = "torchvision:vgg16,torchvision:resnet50"
QUICK = {"models": "recon.models:digits_vgg,recon.models:digits_resnet20", "size": 8}
ROUND_TO = (1, 8, 16)
MiB = 2**20


def images(model: nn.Module, n: int, size: int, seed: int = 0) -> Tensor:
    """``n`` random images (n, C, size, size), C the input channels of ``model``."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, conv.in_channels, size, size, generator=g)


def build(spec: str, n: int, size: int) -> tuple[nn.Module, Tensor]:
    """The model of ``spec`` (seeded), BatchNorm statistics re-estimated on the first 64
    of ``n`` random images, and the images."""
    torch.manual_seed(0)
    model = load_model(spec)
    x = images(model, n, size)
    return reestimate_bn(model, x[:64].split(16)), x


def side(config: dict[str, Any]) -> dict[str, Any]:
    """One pruning run (in a child process): ``bench.run``'s numbers."""
    model, x = build(config["model"], config["images"], config["size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images for wide layers: under-determined
        result, pruned = bench.run(
            model,
            x,
            name=config["model"],
            speedup=config["speedup"],
            method=config.get("method", "lasso"),
            reconstruct=config.get("reconstruct", "lstsq"),
            allocation=config["allocation"],
            samples_per_image=config["samples_per_image"],
            batch_size=config["batch_size"],
            cache_bytes=int(config["cache_mb"] * MiB),
            seed=config["seed"],
            repeats=config["repeats"],
            warmup=False,  # one-time costs are seconds against minutes here
            single_pass=config.get("single_pass", True),
            block_dtype=config.get("block_dtype", "float64"),
            device=config.get("device", "cpu"),
        )
    out = result.to_dict()
    out["allocation"] = config["allocation"]
    out["passes"] = "single" if config.get("single_pass", True) else "double (older)"
    out["block_dtype"] = config.get("block_dtype", "float64")
    out["units"] = len(pruned.report.layers)
    return out


def _ms(model: nn.Module, x: Tensor, repeats: int) -> float:
    """Median milliseconds of one forward pass of ``x`` (inference mode, one warm-up)."""
    return 1000 * bench.forward_seconds(model, [x], repeats=repeats)


def latency(
    spec: str,
    size: int,
    speedup: float,
    batches: tuple[int, ...],
    repeats: int,
    device: str = "cpu",
    ops: list[dict[str, Any]] | None = None,
):
    """Latency of the original and of models pruned with ``round_to`` 1, 8 and 16 (uniform
    split, 16 images: the shapes matter here, not the weights; pruned on the CPU), on
    ``device``, contiguous and channels_last. On the CPU, rows of milliseconds by
    operator at the first batch size (original and ``round_to=1``) go into ``ops``."""
    model, x = build(spec, 16, size)
    pruned = {}
    for round_to in ROUND_TO:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = recon.prune(
                    model,
                    x.split(8),
                    speedup=speedup,
                    method="lasso",  # as the page says (not the default, obs)
                    allocation="uniform",
                    round_to=round_to,
                    samples_per_image=2,
                    progress=False,
                )
        except ValueError as e:  # a small model cannot reach the target in such steps
            print(f"{spec}: round_to={round_to} skipped: {e}")
            continue
        pruned[round_to] = (r.model.eval().to(device), r.report.speedup)
    model = model.to(device)
    rows = []
    for batch in batches:
        xb = images(model, batch, size, seed=1).to(device)
        for fmt in (torch.contiguous_format, torch.channels_last):
            name = "channels_last" if fmt is torch.channels_last else "contiguous"
            xf = xb.contiguous(memory_format=fmt)
            reps = repeats * (5 if batch == 1 else 1)
            t_o = _ms(model.to(memory_format=fmt), xf, reps)
            for round_to, (m, flops_ratio) in pruned.items():
                t_p = _ms(m.to(memory_format=fmt), xf, reps)
                row = {
                    "model": spec,
                    "device": str(device),
                    "batch": batch,
                    "format": name,
                    "round_to": round_to,
                    "flops_ratio": flops_ratio,
                    "original_ms": t_o,
                    "pruned_ms": t_p,
                    "speedup": t_o / t_p,
                }
                row["vs_flops"] = row["speedup"] / flops_ratio
                rows.append(row)
                if ops is not None and round_to == 1 and batch == batches[0] and device == "cpu":
                    ops += _operators(spec, batch, name, model, m, xf, reps)
                print(
                    f"{spec:<24} batch {batch:>2} {name:<13} round_to {round_to:>2}  FLOPs "
                    f"{flops_ratio:.2f}x  {t_o:9.1f} ms -> {t_p:9.1f} ms = "
                    f"{row['speedup']:.2f}x ({row['vs_flops']:.2f} of the FLOPs ratio)"
                )
    return rows


def _operators(spec, batch, fmt, model, pruned, x, repeats) -> list[dict[str, Any]]:
    """Milliseconds per forward pass by operator group (``_measure.GROUPS``, the groups
    ``profile_latency`` prints), original and pruned, one row per group."""
    before, after = (by_operator(m, x, repeats) for m in (model, pruned))
    return [
        {"model": spec, "batch": batch, "format": fmt, "group": g}
        | {"original_ms": before.get(g, 0.0), "pruned_ms": after.get(g, 0.0)}
        for g in GROUPS
    ]


def machine_line(m: dict[str, Any], device: str) -> str:
    """A page's machine sentence (no final stop) from ``bench``'s machine facts ``m``."""
    return (
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch "
        f"threads, {m['memory_gib']} GiB, Python {m['python']}, torch {m['torch']}"
        + (f"; GPU {m['cuda']}" if m.get("cuda") else "")
        + f". Run on `{device}`"
    )


def markdown(
    args: Any, runs: list[dict], lat: list[dict], seconds: float, ops: list[dict] = ()
) -> str:
    """The 224-px page: pruning runs, latency table, the goals (pruning time, latency)."""
    m = runs[0]["machine"] if runs else bench.machine()
    cmd = " ".join(["python scripts/bench.py", *args.argv])
    size = args.size
    lines = [
        f"# Benchmarks at {size} px",
        "",
        f"Written by `scripts/bench.py scale224` ({seconds / 60:.0f} minutes); rerun it to "
        "check every number on your machine:",
        "",
        "```",
        cmd,
        "```",
        "",
        machine_line(m, getattr(args, "device", "cpu")) + ".",
        "",
        "Models with random weights (seeded) and BatchNorm statistics re-estimated on the "
        f"images; {args.scale_images} random {size}-px images, batches of "
        f"{args.batch_size}, 10 positions per image, LASSO with the cross-validated "
        f"least-squares re-fit (the defaults), {args.speedup:g}x FLOPs. *Forward passes*: "
        "time in units of one plain forward pass of the calibration images through the "
        "original model, measured in the same process. Timings only: random weights say "
        "nothing about accuracy.",
        "",
        "## Pruning",
        "",
        "| model | allocation | calibration passes | block products | units pruned | "
        "forward pass (s) | pruning (s) | forward passes | phases (forward passes) | "
        "peak RSS (MiB) | FLOPs ratio |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        fwd = r["forward_seconds"]
        phases = ", ".join(f"{k} {v / fwd:.2f}" for k, v in r["phases"].items())
        lines.append(
            f"| `{r['model']}` | {r['allocation']} | {r['passes']} | "
            f"{r.get('block_dtype', 'float64')} | {r['units']} | {fwd:.1f} | "
            f"{r['prune_seconds']:.1f} | {r['ratio']:.1f} | {phases} | "
            f"{r['peak_rss'] / MiB:,.0f} | {r['flops_ratio']:.2f} |"
        )
    lines += [
        "",
        "## Latency of the pruned models",
        "",
        f"Pruned at {args.speedup:g}x with the uniform split from 16 images (the shapes "
        "matter, not the weights), `round_to` 1, 8 and 16; `torch.inference_mode`, one "
        "warm-up, median of repeats; the original and the pruned model in the same memory "
        "format.",
        "",
        "| model | batch | memory format | round_to | FLOPs ratio | original (ms) | "
        "pruned (ms) | speed-up | speed-up / FLOPs ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for x in lat:
        lines.append(
            f"| `{x['model']}` | {x['batch']} | {x['format']} | {x['round_to']} | "
            f"{x['flops_ratio']:.2f} | {x['original_ms']:.1f} | {x['pruned_ms']:.1f} | "
            f"{x['speedup']:.2f}x | {x['vs_flops']:.2f} |"
        )
    lines += _operator_tables(ops)
    lines += ["", "## Goals", "", *_goals(runs, lat), ""]
    return "\n".join(lines)


def _operator_tables(ops: list[dict]) -> list[str]:
    """Where a forward pass's time goes, original against pruned, per model."""
    if not ops:
        return []
    first = ops[0]
    lines = [
        "",
        "## Where the time goes",
        "",
        f"Self CPU time by operator (`torch.profiler`, as `scripts/profile_latency.py` "
        f"groups it), batch {first['batch']}, the original and the `round_to` 1 model "
        "above; ms per forward pass. *Ratio*: original over pruned (the FLOPs ratio is "
        "what the convolutions would reach if their time followed their FLOPs).",
    ]
    for spec in dict.fromkeys(o["model"] for o in ops):
        fmts = list(dict.fromkeys(o["format"] for o in ops if o["model"] == spec))
        cell = {(o["format"], o["group"]): o for o in ops if o["model"] == spec}
        lines += [
            "",
            f"`{spec}`:",
            "",
            "| operator | " + " | ".join(f"{f}: original | pruned | ratio" for f in fmts) + " |",
            "|---|" + "---:|---:|---:|" * len(fmts),
        ]
        groups = [
            g
            for g in GROUPS
            if any(cell[f, g]["original_ms"] or cell[f, g]["pruned_ms"] for f in fmts)
        ]
        for g in [*groups, "total"]:
            cells = []
            for f in fmts:
                if g == "total":
                    a = sum(cell[f, h]["original_ms"] for h in GROUPS)
                    b = sum(cell[f, h]["pruned_ms"] for h in GROUPS)
                else:
                    a, b = cell[f, g]["original_ms"], cell[f, g]["pruned_ms"]
                ratio = f"{a / b:.2f}x" if a and b else ""
                cells.append(f"{a:.2f} | {b:.2f} | {ratio}")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


def _goals(runs: list[dict], lat: list[dict]) -> list[str]:
    ok = {True: "met", False: "**not met**"}
    out = []
    for r in runs:
        out.append(
            f"- `{r['model']}` ({r['allocation']}, {r['passes']} passes, "
            f"{r.get('block_dtype', 'float64')} blocks): pruning in ≤ 3 "
            "forward passes: "
            f"{r['ratio']:.1f} — {ok[r['ratio'] <= 3]}."
        )
    if lat:
        best = max(lat, key=lambda x: x["vs_flops"])
        low = [x for x in lat if x["vs_flops"] < 0.8]
        out.append(
            f"- Latency speed-up ≥ 0.8 × the FLOPs ratio: {len(lat) - len(low)} of "
            f"{len(lat)} rows — {ok[not low]}; best {best['vs_flops']:.2f} "
            f"(`{best['model']}`, batch {best['batch']}, {best['format']}, round_to "
            f"{best['round_to']})."
        )
    return out
