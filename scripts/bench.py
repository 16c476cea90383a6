"""Speed and memory of recon: against a naive reference, as sizes grow, and the real
inference speed-up of the pruned models. Writes docs/benchmarks.md.

    python scripts/bench.py compare          # recon vs naive, shipped VGG-16, 1,000 images
    python scripts/bench.py scale            # images x4, width x2 (cache on and off)
    python scripts/bench.py latency          # original vs pruned, VGG and ResNet, 2x and 4x
    python scripts/bench.py scale224 --out docs/benchmarks_224.md   # torchvision, 224 px
    python scripts/bench.py all --out docs/benchmarks.md   # all four (224 px: its own page)
    python scripts/bench.py methods --out docs/benchmarks.md    # recon's default beside LASSO
    python scripts/bench.py methods --method-models torchvision:vgg16@224x64,\
        torchvision:resnet50@224x64 --out docs/benchmarks_224.md   # the same at 224 px

Each measured side of ``compare`` and ``scale`` runs in its own child process, so that
peak memories are not mixed (``--in-process`` runs them here, for tests). The naive
reference lives in ``scripts/_naive.py``, not in the library. ``--quick`` shrinks
everything to a tiny model and a few images (seconds; what tests/test_bench.py runs).
``methods`` writes its table into a section of the ``--out`` page (replaced on a rerun),
leaving the rest of the page as it was.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _bench224  # noqa: E402
import _naive  # noqa: E402

import recon  # noqa: E402
from recon import bench  # noqa: E402
from recon.cli import _samples, load_data, load_model  # noqa: E402

MiB = 2**20
QUICK = {
    "model": "recon.models:digits_vgg",
    "data": "digits",
    "images": 64,
    "batch_size": 32,
    "latency_models": "recon.models:digits_vgg,recon.models:digits_resnet20",
    "repeats": 3,
}


# --------------------------------------------------------------------------- inputs


def _images(spec: str, n: int) -> tuple[Tensor, str]:
    """``n`` calibration images for data ``spec``, and where they come from."""
    if spec == "fmnist" and n > 1000:
        from recon.data import load_embedded, load_fashion_mnist, to_tensor32

        try:
            images, _ = load_fashion_mnist("train")
            return to_tensor32(images[:n]), f"first {n} Fashion-MNIST training images"
        except (FileNotFoundError, OSError, ValueError):
            x_calib, _, x_eval, _ = load_embedded()
            pool = torch.cat([x_calib, x_eval, x_calib.flip(3), x_eval.flip(3)])
            return pool[:n], f"{n} embedded Fashion-MNIST images and their mirror images"
    if spec == "digits":
        from recon.data import load_digits_split

        x_train, _, x_test, _ = load_digits_split()
        pool = torch.cat([x_test, x_train])
    else:
        pool, _ = load_data(spec)
    if len(pool) < n:
        raise ValueError(f"The '--data' {spec!r} has {len(pool)} images, fewer than {n}.")
    what = "embedded Fashion-MNIST calibration images" if spec == "fmnist" else spec
    return pool[:n], f"{n} {what}"


def _model(spec: str, width: float = 1.0) -> nn.Module:
    """The model of ``spec``; ``width`` > 1 builds the same architecture that much wider
    (untrained, seeded: for timing only). Seeded, so that an untrained factory model is
    the same in every process."""
    torch.manual_seed(0)
    if width == 1.0:
        return load_model(spec)
    from recon import models

    if spec.startswith("pretrained:"):
        entry = models._manifest()[spec.split(":", 1)[1]]
        kwargs = dict(entry["kwargs"])
        kwargs["width"] = kwargs.get("width", 1.0) * width
        return getattr(models, entry["builder"])(**kwargs).eval()
    module, _, name = spec.partition(":")
    factory = getattr(__import__(module, fromlist=[name]), name)
    return factory(width=width).eval()


# --------------------------------------------------------------------------- one side


def _side(config: dict[str, Any]) -> dict[str, Any]:
    """Run one measured side (``recon``, ``naive`` or ``recon224``) in this process."""
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    if config["side"] == "recon224":
        return _bench224.side(config)
    model = _model(config["model"], config.get("width", 1.0))
    x, source = _images(config["data"], config["images"])
    batches = list(x.split(config["batch_size"]))
    if config["side"] == "recon":
        result, pruned = bench.run(
            model,
            x,
            name=config["model"],
            speedup=config["speedup"],
            method=config.get("method", "lasso"),
            # The naive reference re-fits by plain least squares: the same algorithm.
            reconstruct=config.get("reconstruct", "lstsq_plain"),
            samples_per_image=config["samples_per_image"],
            batch_size=config["batch_size"],
            cache_bytes=int(config["cache_mb"] * MiB),
            seed=config["seed"],
            repeats=config["repeats"],
            block_dtype=config.get("block_dtype", "float64"),
        )
        out = result.to_dict()
        out["kept"] = pruned.kept
        out["layers"] = [
            {"name": r.name, "error_before": r.error_before, "error_after": r.error_after}
            for r in pruned.report.layers
        ]
    else:
        fwd = bench.forward_seconds(model, batches, repeats=config["repeats"])
        base = bench.rss_bytes()
        bench.reset_peak_rss()
        t0 = time.perf_counter()
        naive = _naive.prune_naive(
            model,
            x,
            speedup=config["speedup"],
            samples_per_image=config["samples_per_image"],
            batch_size=config["batch_size"],
            seed=config["seed"],
        )
        seconds = time.perf_counter() - t0 - naive["check"]  # the check is not the method
        out = {
            "forward_seconds": fwd,
            "prune_seconds": seconds,
            "ratio": seconds / fwd,
            "phases": naive["phases"],
            "peak_rss": bench.peak_rss_bytes(),
            "base_rss": base,
            "kept": naive["kept"],
            "layers": naive["layers"],
            "machine": bench.machine(),
        }
    out.update(side=config["side"], source=source, config=config)
    return out


def _run_side(config: dict[str, Any], in_process: bool) -> dict[str, Any]:
    if in_process:
        return _side(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        env = dict(os.environ)
        if config.get("threads"):
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(config["threads"])
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(config)]
        subprocess.run([*cmd, str(path)], check=True, env=env)
        return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- commands


def _config(args: argparse.Namespace, side: str, **over: Any) -> dict[str, Any]:
    config = {
        "side": side,
        "model": args.model,
        "data": args.data,
        "images": args.images,
        "batch_size": args.batch_size,
        "samples_per_image": args.samples_per_image,
        "speedup": args.speedup,
        "seed": args.seed,
        "cache_mb": args.cache_mb,
        "threads": args.threads,
        "repeats": args.repeats,
        "width": 1.0,
    }
    config.update(over)
    return config


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """recon and the naive reference on the same model, data and positions."""
    r = _run_side(_config(args, "recon"), args.in_process)
    # float32 block products (block_dtype="float32"), against the default float64
    r32 = _run_side(_config(args, "recon", block_dtype="float32"), args.in_process)
    n = _run_side(_config(args, "naive"), args.in_process)
    units = list(n["kept"])
    rows = []
    for layer in n["layers"]:
        name = layer["name"]
        mine = next(x for x in r["layers"] if x["name"] == name)
        rows.append(
            {
                "name": name,
                "channels": layer["channels"],
                "same": r["kept"][name] == n["kept"][name],
                "same_at_lambda": layer["same_at_lambda"],
                "recon_before": mine["error_before"],
                "recon_after": mine["error_after"],
                "naive_before": layer["error_before"],
                "naive_after": layer["error_after"],
                "alpha": layer["alpha"],
                "fits": layer["lasso_fits"],
                "z_mib": layer["z_bytes"] / MiB,
            }
        )
    out = {
        "recon": r,
        "recon32": r32,
        "float32_same_units": sum(r["kept"][u] == r32["kept"][u] for u in r["kept"]),
        "float32_error_diff": max(
            abs(a["error_after"] - b["error_after"]) / max(b["error_after"], 1e-12)
            for a, b in zip(r32["layers"], r["layers"], strict=True)
        ),
        "naive": n,
        "rows": rows,
        "same_units": sum(row["same"] for row in rows),
        "units": len(units),
        "speed_ratio": n["prune_seconds"] / r["prune_seconds"],
        "memory_ratio": n["peak_rss"] / r["peak_rss"],
    }
    print(_compare_text(out))
    return out


def _compare_text(c: dict[str, Any]) -> str:
    r, n = c["recon"], c["naive"]
    lines = [
        f"recon vs naive: {r['config']['model']}, {r['source']}, "
        f"{r['config']['samples_per_image']} positions per image, {r['config']['speedup']:g}x",
        f"  time        recon {r['prune_seconds']:8.2f} s ({r['ratio']:.1f} forward passes)   "
        f"naive {n['prune_seconds']:8.2f} s ({n['ratio']:.1f})   naive/recon "
        f"{c['speed_ratio']:.1f}x",
        f"  peak RSS    recon {r['peak_rss'] / MiB:8.0f} MiB   naive {n['peak_rss'] / MiB:8.0f} "
        f"MiB   naive/recon {c['memory_ratio']:.2f}x   (over baseline: "
        f"{(r['peak_rss'] - r['base_rss']) / MiB:.0f} vs "
        f"{(n['peak_rss'] - n['base_rss']) / MiB:.0f}"
        " MiB)",
        f"  recon phases: {_phases(r['phases'])}",
        f"  naive phases: {_phases(n['phases'])}",
        f"  same channels kept: {c['same_units']} of {c['units']} units",
        f"  float32 block products: {_float32_text(c)}",
    ]
    for row in c["rows"]:
        if not row["same"]:
            lines.append(
                f"    {row['name']}: differ; error after re-fit recon {row['recon_after']:.5f} "
                f"naive {row['naive_after']:.5f} (before {row['recon_before']:.5f} / "
                f"{row['naive_before']:.5f})"
            )
    same_lambda = sum(row["same_at_lambda"] for row in c["rows"])
    lines.append(
        f"  recon's LARS at the naive's λ on the same data keeps the same channels: "
        f"{same_lambda} of {len(c['rows'])} units"
    )
    return "\n".join(lines)


def _float32_text(c: dict[str, Any]) -> str:
    """recon with float32 block products against the default float64 path."""
    if "recon32" not in c:
        return "not measured"
    r, r32 = c["recon"], c["recon32"]
    return (
        f"{r32['prune_seconds']:.2f} s ({r32['ratio']:.1f} forward passes; statistics "
        f"{r32['phases'].get('stats', 0):.2f} s) against float64's {r['prune_seconds']:.2f} s "
        f"({r['ratio']:.1f}; statistics {r['phases'].get('stats', 0):.2f} s); the same "
        f"channels in {c['float32_same_units']} of {len(r['kept'])} units, layer errors "
        f"after the re-fit within {c['float32_error_diff']:.1e} (relative)"
    )


def _phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())


def scale(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recon at the base size, with calibration images x4, and with channel width x2."""
    sizes = [
        ("base", {}),
        ("images x4", {"images": args.images * 4}),
        ("width x2", {"width": 2.0}),
    ]
    runs = []
    for label, over in sizes:
        for cache_mb in (args.cache_mb, 0.0):
            config = _config(args, "recon", cache_mb=cache_mb, **over)
            out = _run_side(config, args.in_process)
            out["label"] = label
            runs.append(out)
            print(
                f"{label:<10} cache {cache_mb:6.0f} MiB  {out['prune_seconds']:7.2f} s = "
                f"{out['ratio']:5.1f} forward passes   peak RSS {out['peak_rss'] / MiB:6.0f} MiB "
                f"(+{(out['peak_rss'] - out['base_rss']) / MiB:.0f})   stats "
                f"{out['stats_macs'] / 1e9:.2f} G multiply-adds"
            )
    return runs


def _latency_ms(model: nn.Module, x: Tensor, repeats: int) -> float:
    """Median milliseconds of one forward pass of ``x`` (inference mode, after warm-up)."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    """CPU latency of the original and the pruned models, batch 1 and 64."""
    if args.threads:
        torch.set_num_threads(args.threads)
    x, _ = _images(args.data, args.images)
    rows = []
    for spec in args.latency_models.split(","):
        model = _model(spec)
        for target in (2.0, 4.0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = recon.prune(
                    model,
                    x.split(args.batch_size),
                    speedup=target,
                    method="lasso",  # as the page says (not the default, obs)
                    allocation="uniform",
                    progress=False,
                )
            pruned = result.model.eval()
            for batch in (1, 64):
                xb = x[:batch] if len(x) >= batch else x.repeat(batch // len(x) + 1, 1, 1, 1)
                xb = xb[:batch].contiguous()
                reps = args.repeats * (20 if batch == 1 else 3)
                t_o = _latency_ms(model, xb, reps)
                t_p = _latency_ms(pruned, xb, reps)
                row = {
                    "model": spec,
                    "target": target,
                    "flops_ratio": result.report.speedup,
                    "batch": batch,
                    "original_ms": t_o,
                    "pruned_ms": t_p,
                    "speedup": t_o / t_p,
                }
                row["vs_flops"] = row["speedup"] / row["flops_ratio"]
                rows.append(row)
                print(
                    f"{spec:<28} {target:g}x  FLOPs {row['flops_ratio']:.2f}x  batch {batch:>2}  "
                    f"{t_o:8.2f} ms -> {t_p:8.2f} ms  = {row['speedup']:.2f}x "
                    f"({row['vs_flops']:.2f} of the FLOPs ratio)"
                )
    return rows


def scale224(args: argparse.Namespace) -> dict[str, Any]:
    """torchvision VGG-16 and ResNet-50 at 224 px: pruning in forward passes, latency."""
    runs = []
    sides = [(a, True, "float64") for a in args.allocations.split(",")]
    if args.double_pass:  # the older passes, each producer twice, for comparison
        sides.insert(1, (sides[0][0], False, "float64"))
    if args.float32:  # float32 block products in the statistics, for comparison
        sides.insert(1, (sides[0][0], True, "float32"))
    for spec in args.scale_models.split(","):
        for allocation, single, block_dtype in sides:
            config = _config(
                args,
                "recon224",
                model=spec,
                images=args.scale_images,
                size=args.size,
                allocation=allocation,
                single_pass=single,
                block_dtype=block_dtype,
                repeats=1,
                device=args.device,
            )
            out = _run_side(config, args.in_process)
            runs.append(out)
            print(
                f"{spec:<24} {allocation:<8} {'single' if single else 'double'} {block_dtype} "
                f"{out['prune_seconds']:8.1f} s = "
                f"{out['ratio']:5.1f} forward passes of {out['forward_seconds']:.1f} s   "
                f"peak RSS {out['peak_rss'] / MiB:6.0f} MiB   "
                + ", ".join(
                    f"{k} {v / out['forward_seconds']:.2f}" for k, v in out["phases"].items()
                )
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.latency_batches.split(","))
    lat: list[dict[str, Any]] = []
    ops: list[dict[str, Any]] = []
    for spec in args.scale_models.split(",") if not args.skip_latency else ():
        lat += _bench224.latency(
            spec, args.size, args.speedup, batches, args.repeats, device=args.device, ops=ops
        )
    return {"runs": runs, "latency": lat, "operators": ops}


def _method_model(entry: str) -> tuple[str, int | None, int | None]:
    """``MODEL`` or ``MODEL@SIZExIMAGES`` (random images of SIZE px, as ``scale224``)."""
    spec, _, shape = entry.partition("@")
    if not shape:
        return spec, None, None
    size, _, images = shape.partition("x")
    return spec, int(size), int(images)


def methods(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recon's default method (obs) beside LASSO, both with the cross-validated re-fit
    (the default), uniform split: time per phase, each run in its own process."""
    runs = []
    for entry in args.method_models.split(","):
        spec, size, images = _method_model(entry)
        for method in args.methods.split(","):
            over = {"model": spec, "method": method, "reconstruct": "lstsq"}
            if size is None:  # a shipped model on its own data
                config = _config(args, "recon", **over)
            else:
                config = _config(
                    args, "recon224", **over, images=images, size=size, allocation="uniform",
                    single_pass=True, block_dtype="float64", device=args.device,
                )  # fmt: skip
            out = _run_side(config, args.in_process)
            out.update(model=spec, method=method, size=size, images=config["images"], config=config)
            runs.append(out)
            ph = out["phases"]
            print(
                f"{entry:<34} {method:<6} {out['prune_seconds']:8.1f} s = {out['ratio']:5.1f} "
                f"forward passes of {out['forward_seconds']:.3f} s   select+solve / "
                f"(forward+stats) {_fixed_over(ph):.1f}   "
                + ", ".join(f"{k} {v:.2f}" for k, v in ph.items())
            )
    return runs


def _fixed_over(phases: dict[str, float]) -> float:
    """The linear algebra's time (select, solve) over the data passes' (forward, stats)."""
    data = phases.get("forward", 0.0) + phases.get("stats", 0.0)
    return (phases.get("select", 0.0) + phases.get("solve", 0.0)) / data if data else 0.0


METHODS_START = "<!-- scripts/bench.py methods: start -->"
METHODS_END = "<!-- scripts/bench.py methods: end -->"


def methods_markdown(args: argparse.Namespace, runs: list[dict], seconds: float) -> str:
    """The ``methods`` section: one row per model and method."""
    m = runs[0]["machine"] if runs else bench.machine()
    cmd = " ".join(["python scripts/bench.py", *args.argv])
    lines = [
        METHODS_START,
        "## recon's default (obs) beside LASSO",
        "",
        f"Written by `scripts/bench.py methods` ({_dt.date.today().isoformat()}, "
        f"{seconds / 60:.1f} minutes), the rest of this page left as it was; rerun it to "
        "check every number in this section:",
        "",
        "```",
        cmd,
        "```",
        "",
        _bench224.machine_line(m, args.device)
        + (
            f"; load average {args.load:.1f} at the start (other jobs share the machine: "
            "compare the rows of one run, not runs of different days)."
            if getattr(args, "load", None) is not None
            else "."
        ),
        "",
        f"Each model pruned {args.speedup:g}x with the uniform split by recon's default "
        '(`method="obs"`) and by LASSO, both re-fitted by the cross-validated least '
        'squares (`reconstruct="lstsq"`, the default), each run in its own process. '
        "Shipped models: the Fashion-MNIST calibration images; torchvision models: random "
        "weights (seeded, BatchNorm statistics re-estimated on the images) and random "
        "images, timings only. *Forward passes*: time in units of one plain forward pass "
        "of the calibration images through the original model, measured in the same "
        "process; *linear algebra / data*: the select and solve phases over the forward "
        "and stats phases.",
        "",
        "| model | images | method | forward pass (s) | pruning (s) | forward passes | "
        "phases (forward passes) | linear algebra / data | peak RSS (MiB) | FLOPs ratio |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in runs:
        fwd = r["forward_seconds"]
        phases = ", ".join(f"{k} {v / fwd:.2f}" for k, v in r["phases"].items())
        what = f"{r['images']} random, {r['size']} px" if r["size"] else r["source"]
        lines.append(
            f"| `{r['model']}` | {what} | {r['method']} | {fwd:.2f} | {r['prune_seconds']:.1f} "
            f"| {r['ratio']:.1f} | {phases} | {_fixed_over(r['phases']):.1f} | "
            f"{r['peak_rss'] / MiB:,.0f} | {r['flops_ratio']:.2f} |"
        )
    lines += ["", METHODS_END, ""]
    return "\n".join(lines)


def merge_section(page: Path, section: str) -> None:
    """Put ``section`` into ``page`` in place of its previous version (or at the end)."""
    text = page.read_text(encoding="utf-8") if page.exists() else ""
    if METHODS_START in text and METHODS_END in text:
        head, rest = text.split(METHODS_START, 1)
        tail = rest.split(METHODS_END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    page.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- markdown


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    right = ["---:" if i else "---" for i in range(len(headers))]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(right) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _mib(b: float) -> str:
    return f"{b / MiB:,.0f}"


def markdown(args: argparse.Namespace, c: dict, runs: list, lat: list, seconds: float) -> str:
    r, n = c["recon"], c["naive"]
    m = r["machine"]
    cmd = " ".join(["python scripts/bench.py", *args.argv])
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench.py all` "
        f"({_dt.date.today().isoformat()}, {seconds / 60:.0f} minutes). Every number below "
        "comes from that one run: rerun it to check them on your machine.",
        "",
        "```",
        cmd,
        "```",
        "",
        "## Machine",
        "",
        *_md_table(
            ["", ""],
            [
                ["CPU", m["cpu"]],
                ["logical CPUs", m["logical_cpus"]],
                ["torch threads", m["torch_threads"]],
                ["memory", f"{m['memory_gib']} GiB"],
                ["Python / torch", f"{m['python']} / {m['torch']}"],
                ["platform", m["platform"]],
            ],
        ),
        "",
        "## 1. recon against a naive reference",
        "",
        f"Model `{r['config']['model']}`, {r['source']}, batches of "
        f"{r['config']['batch_size']}, {r['config']['samples_per_image']} positions per image, "
        f"LASSO, {r['config']['speedup']:g}x FLOPs target, seed {r['config']['seed']}. "
        "The naive reference (`scripts/_naive.py`) does what the original code and most "
        "PyTorch tools do: for every layer it runs both networks from the input, stores "
        "every sampled patch and target, materialises the per-channel contribution matrix, "
        "runs scikit-learn `Lasso` with a bisection on alpha, and re-fits with "
        "`LinearRegression`. Same units, channel counts and sampled positions as recon, "
        'which re-fits by plain least squares here too (`reconstruct="lstsq_plain"`); '
        + (
            "both sides ran in one process (`--in-process`: peaks are mixed); "
            if args.in_process
            else "each side runs in its own process; "
        )
        + "*forward passes* is the time in units of one plain forward pass of the "
        "calibration set through the original model, measured in the same process. The "
        "naive time leaves out its comparison with recon's LARS (last columns below).",
        "",
        *_md_table(
            ["", "recon", "naive", "naive / recon"],
            [
                [
                    "pruning time (s)",
                    f"{r['prune_seconds']:.2f}",
                    f"{n['prune_seconds']:.2f}",
                    f"{c['speed_ratio']:.1f}x",
                ],
                [
                    "in forward passes",
                    f"{r['ratio']:.1f}",
                    f"{n['ratio']:.1f}",
                    "",
                ],
                [
                    "peak RSS (MiB)",
                    _mib(r["peak_rss"]),
                    _mib(n["peak_rss"]),
                    f"{c['memory_ratio']:.2f}x",
                ],
                [
                    "peak RSS over the process before pruning (MiB)",
                    _mib(r["peak_rss"] - r["base_rss"]),
                    _mib(n["peak_rss"] - n["base_rss"]),
                    "",
                ],
            ],
        ),
        "",
        f"One plain forward pass of the calibration set: {r['forward_seconds']:.3f} s "
        f"(recon's process), {n['forward_seconds']:.3f} s (naive's process).",
        "",
        'With float32 block products (`block_dtype="float32"`: each block of sampled '
        "rows multiplied in float32, the products summed in float64), same run: "
        f"{_float32_text(c)}.",
        "",
        "Where the time goes:",
        "",
        *_md_table(
            ["recon phase", "seconds", "share", "forward passes"],
            [
                [
                    k,
                    f"{v:.2f}",
                    f"{100 * v / r['prune_seconds']:.0f}%",
                    f"{v / r['forward_seconds']:.2f}",
                ]
                for k, v in r["phases"].items()
            ],
        ),
        "",
        *_md_table(
            ["naive phase", "seconds", "share"],
            [
                [k, f"{v:.2f}", f"{100 * v / n['prune_seconds']:.0f}%"]
                for k, v in n["phases"].items()
            ],
        ),
        "",
        f"Work: one forward pass of the calibration set is {r['forward_macs'] / 1e9:.2f} G "
        f"multiply-adds (float32); recon's float64 statistics (patch Grams and cross terms "
        f"of all layers, at the sampled positions) are {r['stats_macs'] / 1e9:.2f} G, "
        f"{r['stats_macs'] / r['forward_macs']:.1f}x as many, at about half the float32 "
        "speed.",
        "",
        f"Channels: {c['same_units']} of {c['units']} layers keep the same channels. "
        "*Same at equal λ*: recon's LASSO (LARS on the channel Gram `ZᵀZ`, `Zᵀy`) at the "
        "naive's λ, on the naive's own data, keeps the naive's channels. Errors are relative "
        "reconstruction errors of the layer's output on the calibration samples, after the "
        "re-fit.",
        "",
        *_md_table(
            [
                "layer",
                "channels",
                "same kept",
                "same at equal λ",
                "recon error",
                "naive error",
                "Lasso fits",
                "Z (MiB)",
            ],
            [
                [
                    row["name"],
                    f"{row['channels'][0]} → {row['channels'][1]}",
                    "yes" if row["same"] else "**no**",
                    "yes" if row["same_at_lambda"] else "no",
                    f"{row['recon_after']:.5f}",
                    f"{row['naive_after']:.5f}",
                    row["fits"],
                    f"{row['z_mib']:.0f}",
                ]
                for row in c["rows"]
            ],
        ),
        "",
        "## 2. Scaling",
        "",
        "recon alone, with the default cache budget and without a cache (`--cache-mb 0`: "
        "every layer runs both networks from the input; same pruned model). *width x2* is "
        "the same architecture with twice the channels, untrained (seeded): timings only.",
        "",
        *_md_table(
            [
                "run",
                "images",
                "cache (MiB)",
                "pruning (s)",
                "forward pass (s)",
                "forward passes",
                "peak RSS (MiB)",
                "over baseline (MiB)",
                "statistics (G mult-adds)",
            ],
            [
                [
                    x["label"],
                    x["images"],
                    f"{x['cache_bytes'] / MiB:.0f}",
                    f"{x['prune_seconds']:.2f}",
                    f"{x['forward_seconds']:.3f}",
                    f"{x['ratio']:.1f}",
                    _mib(x["peak_rss"]),
                    _mib(x["peak_rss"] - x["base_rss"]),
                    f"{x['stats_macs'] / 1e9:.1f}",
                ]
                for x in runs
            ],
        ),
        "",
        "## 3. Inference latency of the pruned models",
        "",
        f"CPU, {m['torch_threads']} thread(s), `torch.inference_mode`, 3 warm-up passes, "
        "median of repeats; pruned by recon (LASSO, default settings) from the calibration "
        "images above.",
        "",
        *_md_table(
            [
                "model",
                "target",
                "FLOPs ratio",
                "batch",
                "original (ms)",
                "pruned (ms)",
                "speed-up",
                "speed-up / FLOPs ratio",
            ],
            [
                [
                    f"`{x['model']}`",
                    f"{x['target']:g}x",
                    f"{x['flops_ratio']:.2f}",
                    x["batch"],
                    f"{x['original_ms']:.2f}",
                    f"{x['pruned_ms']:.2f}",
                    f"{x['speedup']:.2f}x",
                    f"{x['vs_flops']:.2f}",
                ]
                for x in lat
            ],
        ),
        "",
        "## Goals",
        "",
        *_bars(c, runs, lat),
        "",
        "## Commands",
        "",
        "```",
        "python scripts/bench.py all --out docs/benchmarks.md   # everything, this file",
        "python scripts/bench.py compare                        # section 1",
        "python scripts/bench.py scale                          # section 2",
        "python scripts/bench.py latency                        # section 3",
        "python scripts/bench.py scale224 --out docs/benchmarks_224.md   # 224 px, own page",
        "recon bench                                            # recon's side of section 1",
        "python scripts/bench.py all --quick --out /tmp/b.md    # tiny sizes, seconds",
        "```",
        "",
    ]
    return "\n".join(lines)


def _bars(c: dict, runs: list, lat: list) -> list[str]:
    r, n = c["recon"], c["naive"]
    ok = {True: "met", False: "**not met**"}
    out = []
    share = r["phases"].get("stats", 0.0) / r["forward_seconds"]
    fwd = r["phases"].get("forward", 0.0) / r["forward_seconds"]
    out.append(
        f"- Pruning time ≤ 3 forward passes: {r['ratio']:.1f} — {ok[r['ratio'] <= 3]}. "
        f"The float64 statistics alone take {share:.1f} forward passes (their multiply-adds "
        f"are {r['stats_macs'] / r['forward_macs']:.1f}x the forward's, in float64), and the "
        f"network passes {fwd:.1f} (the original once, for every unit's targets, and the "
        "pruned network once per unit, from the activations cached at the unit's input)."
    )
    out.append(
        f"- ≥ 10x faster than the naive reference: {c['speed_ratio']:.1f}x — "
        f"{ok[c['speed_ratio'] >= 10]}."
    )
    out.append(
        f"- Peak memory not above the naive reference's: {_mib(r['peak_rss'])} vs "
        f"{_mib(n['peak_rss'])} MiB — {ok[r['peak_rss'] <= n['peak_rss']]}."
    )
    by = {(x["label"], x["cache_bytes"] > 0): x for x in runs}
    for cached in (False, True):
        a, b = by.get(("base", cached)), by.get(("images x4", cached))
        if a and b:
            grow = (b["peak_rss"] - b["base_rss"]) - (a["peak_rss"] - a["base_rss"])
            what = "with the cache" if cached else "without the cache"
            out.append(
                f"- Peak memory as images grow x4, {what}: {_mib(a['peak_rss'])} → "
                f"{_mib(b['peak_rss'])} MiB ({grow / MiB:+.0f} MiB over baseline)"
                + (
                    "; the cache holds activations of every calibration image, up to its "
                    "budget, by design."
                    if cached
                    else "."
                )
            )
    same = c["same_units"] == c["units"]
    worse = [
        row["name"] for row in c["rows"] if row["recon_after"] > row["naive_after"] * (1 + 1e-3)
    ]
    out.append(
        f"- Same channels as the naive LASSO: {c['same_units']} of {c['units']} layers — "
        f"{ok[same]}; reconstruction error equal or lower on "
        f"{c['units'] - len(worse)} of {c['units']} layers"
        + (f" (higher: {', '.join(worse)})." if worse else ".")
    )
    b64 = [x for x in lat if x["batch"] == 64]
    if b64:
        low = [x for x in b64 if x["vs_flops"] < 0.8]
        out.append(
            f"- Latency speed-up ≥ 0.8 x FLOPs ratio at batch 64: "
            f"{len(b64) - len(low)} of {len(b64)} — {ok[not low]}"
            + (
                "; below: "
                + ", ".join(f"`{x['model']}` {x['target']:g}x ({x['vs_flops']:.2f})" for x in low)
                + "."
                if low
                else "."
            )
        )
    return out


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command",
        choices=("compare", "scale", "latency", "scale224", "methods", "all", "_child"),
    )
    parser.add_argument("child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="pretrained:vgg16_fmnist", help="recon prune --model")
    parser.add_argument("--data", default="fmnist", help="recon prune --data (default fmnist)")
    parser.add_argument("--images", type=int, default=1000, help="calibration images (1000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples-per-image", type=_samples, default=10, metavar="N|all")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-mb", type=float, default=1024.0, help="recon's cache (MiB)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument(
        "--latency-models",
        default="pretrained:vgg16_fmnist,pretrained:resnet20_fmnist",
        help="comma-separated model specs for 'latency'",
    )
    parser.add_argument(
        "--scale-models",
        default=_bench224.MODELS,
        help="comma-separated model specs for 'scale224' (torchvision VGG-16, ResNet-50)",
    )
    parser.add_argument(
        "--method-models",
        default="pretrained:vgg16_fmnist,pretrained:resnet20_fmnist,torchvision:resnet18@64x40",
        help="'methods': comma-separated MODEL (a shipped model on --data) or "
        "MODEL@SIZExIMAGES (random images, as 'scale224')",
    )
    parser.add_argument(
        "--methods", default="obs,lasso", help="'methods': selection methods (obs,lasso)"
    )
    parser.add_argument("--size", type=int, default=224, help="'scale224' image size (224)")
    parser.add_argument(
        "--scale-images", type=int, default=256, help="'scale224' random images (256)"
    )
    parser.add_argument(
        "--allocations", default="uniform,auto", help="'scale224' allocations (uniform,auto)"
    )
    parser.add_argument(
        "--double-pass",
        action="store_true",
        help="'scale224': also time the older calibration passes (each producer twice)",
    )
    parser.add_argument(
        "--skip-224",
        action="store_true",
        help="'all': leave out the 224-px part (docs/benchmarks_224.md stays as it is)",
    )
    parser.add_argument(
        "--float32",
        action="store_true",
        help="'scale224': also time float32 block products in the statistics "
        "(block_dtype='float32')",
    )
    parser.add_argument(
        "--latency-batches", default="1,32", help="'scale224' latency batch sizes (1,32)"
    )
    parser.add_argument(
        "--skip-latency",
        action="store_true",
        help="'scale224': time the pruning only, not the pruned models' latency",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="'scale224': where to prune and time (cpu; cuda on a GPU machine: scripts/gpu_run.sh)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and data (seconds)")
    parser.add_argument(
        "--in-process", action="store_true", help="no child processes (peaks are mixed)"
    )
    parser.add_argument("--json", help="write the numbers as JSON here")
    parser.add_argument(
        "--out",
        help="'all': write the Markdown here (docs/benchmarks.md; the 224-px page beside "
        "it, as benchmarks_224.md); 'scale224': write its page here; 'methods': put its "
        "section into this page",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "_child":
        config, path = json.loads(args.child[0]), args.child[1]
        Path(path).write_text(json.dumps(_side(config)), encoding="utf-8")
        return {}
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.scale_models, args.size = _bench224.QUICK["models"], _bench224.QUICK["size"]
        args.scale_images, args.latency_batches = 16, "1"
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if args.command in ("compare", "all"):
        out["compare"] = compare(args)
    if args.command in ("scale", "all"):
        out["scale"] = scale(args)
    if args.command in ("latency", "all"):
        out["latency"] = latency(args)
    if args.command == "methods":
        args.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if args.quick:
            args.method_models = "recon.models:digits_vgg,recon.models:digits_resnet20@8x16"
        out["methods"] = methods(args)
        if args.out:
            section = methods_markdown(args, out["methods"], time.perf_counter() - t0)
            merge_section(Path(args.out), section)
            print(f"written to {args.out}")
    if args.command == "scale224" or (args.command == "all" and not args.skip_224):
        t224 = time.perf_counter()
        out["scale224"] = scale224(args)
        page = args.out
        if args.command == "all" and args.out:
            page = str(Path(args.out).with_name("benchmarks_224.md"))
        if page:
            seconds = time.perf_counter() - t224
            res = out["scale224"]
            text = _bench224.markdown(args, res["runs"], res["latency"], seconds, res["operators"])
            Path(page).write_text(text, encoding="utf-8")
            print(f"written to {page}")
    if args.command == "all" and args.out:
        text = markdown(
            args, out["compare"], out["scale"], out["latency"], time.perf_counter() - t0
        )
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"written to {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
