"""Which torchvision classification models recon prunes, and how well the re-fit does.

Each model is built with random weights (seeded), its BatchNorm statistics re-estimated
on Fashion-MNIST images upscaled to 3 × 64 px (so activations have realistic scales),
then pruned by LASSO with the uniform split at 1.5× and 2× FLOPs from a few calibration
images, with the least-squares re-fit and without one (``reconstruct="none"``). A model
recon refuses is listed with the reason it gives. The relative logit error
``Σ‖pruned − original‖² / Σ‖original‖²`` is measured on as many held-out images. No
accuracy: the weights are random. Writes ``<out-dir>/coverage.md``.

    python scripts/model_coverage.py                         # one model per family (docs/)
    python scripts/model_coverage.py --models all            # every classification model
    python scripts/model_coverage.py --quick --out-dir /tmp/c    # two small models (smoke test)

Rows go to ``<out-dir>/coverage.jsonl`` as each model finishes; ``--resume`` keeps the
rows already there and runs only the models that have none.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

import recon
from recon.graph import find_units

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import logit_error, reestimate_bn
from refit_torchvision import _images

#: One model per torchvision family (``--models all`` lists every classification model).
FAMILIES = (
    "alexnet", "vgg11_bn", "resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d",
    "densenet121", "googlenet", "inception_v3", "squeezenet1_1", "mobilenet_v2",
    "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0",
    "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t",
)  # fmt: skip
QUICK = ("resnet18", "mobilenet_v2")
SIZE = {"inception_v3": 96, "maxvit_t": 224}  # input px (64 otherwise)
#: Builder arguments: Inception-v3's auxiliary head (train mode only, used here while
#: re-estimating BatchNorm) needs 299-px inputs; the pruned network does not use it.
#: ViT-B/16 is built for 64-px images (16 tokens + 1; at 224 px one model's four
#: prunes took over 20 min of one CPU thread).
KWARGS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "vit_b_16": {"image_size": 64},
}
MAX_PARAMS = 150e6  # larger models are listed, not run (--max-params)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _skip_summary(graph: Any) -> str:
    """The most common skip reasons, shortened, with counts."""
    counts: dict[str, int] = {}
    for reason in graph.skipped.values():
        short = re.sub(r"'[^']*'", "…", reason)
        while re.search(r"\([^()]*\)", short):  # nested parentheses, innermost first
            short = re.sub(r"\([^()]*\)", "", short)
        short = " ".join(short.split(":")[0].split()).replace(" ,", ",")[:90]
        counts[short] = counts.get(short, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:2]
    return "; ".join(f"{n}× {r}" for r, n in top)


def _make_pruning_visible(net: torch.nn.Module) -> None:
    """Make random weights show pruning in the logits: ConvNeXt's layer scales (1e-6 at
    initialisation, leaving every block's output invisible) are set to 1, and a linear
    layer initialised to zero (ViT's head: every logit 0) gets random weights."""
    torch.manual_seed(1)
    for m in net.modules():
        scale = getattr(m, "layer_scale", None)
        with torch.no_grad():
            if isinstance(scale, torch.nn.Parameter):
                scale.fill_(1.0)
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                torch.nn.init.trunc_normal_(m.weight, std=0.02)


def run_model(
    name: str, n_images: int, size: int | None = None, max_params: float = MAX_PARAMS
) -> dict[str, Any]:
    """Prune ``name`` at 1.5× and 2×; the measured ratios and logit errors, or why not."""
    import torchvision

    row: dict[str, Any] = {"model": name}
    size = size or SIZE.get(name, 64)
    row["size"] = size
    t0 = time.perf_counter()
    try:
        data = _images(256, 10_000, size)
        calib, held = _images(n_images, 0, size), _images(n_images, 20_000, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            net = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {}))
            params = sum(p.numel() for p in net.parameters())
            row["params"] = params
            if params > max_params:
                row["refused"] = f"not run: {params / 1e6:.0f} M parameters (--max-params)"
                return row
            _make_pruning_visible(net)
            net = reestimate_bn(net, data.split(64))
            graph = find_units(net)
    except Exception as e:  # a model that cannot be built or traced: recorded
        row["refused"] = _first_line(e)
        return row
    row["units"] = sum(u.kind != "sampler" for u in graph.units)
    row["samplers"] = sum(u.kind == "sampler" for u in graph.units)
    row["skipped"] = len(graph.skipped)
    row["skip_summary"] = _skip_summary(graph)
    for target in (1.5, 2.0):
        for mode in ("lstsq", "none"):
            key = f"{target:g}x_{mode}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = recon.prune(
                        net,
                        calib.split(16),
                        speedup=target,
                        method="lasso",  # as the page says (not the default, obs)
                        allocation="uniform",
                        reconstruct=mode,
                        progress=False,
                    )
            except (ValueError, TypeError, RuntimeError) as e:
                msg = _first_line(e)
                if "maximum achievable speedup" not in msg:  # refused before any work
                    row["refused"] = msg
                    return row
                row[key] = {"error": msg}
                break  # the same limit without a re-fit
            row[key] = {
                "speedup": result.report.speedup,
                "error": logit_error(net, result.model, held),
            }
    row["seconds"] = time.perf_counter() - t0
    return row


def _cell(row: dict[str, Any], target: float) -> str:
    a, b = row.get(f"{target:g}x_lstsq"), row.get(f"{target:g}x_none")
    if a is None:
        return "–"
    if isinstance(a.get("error"), str):
        msg = a["error"]
        if "maximum achievable speedup" in msg:
            return "max " + msg.split("speedup, ")[1].split(" ")[0] + "×"
        return "error: " + msg[:80]
    none = f"{b['error']:.3f}" if b and not isinstance(b.get("error"), str) else "–"
    return f"{a['speedup']:.2f}×: **{a['error']:.3f}** / {none}"


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread" if n == 1 else f"{n} threads"


def markdown(rows: list[dict[str, Any]], argv: list[str], n_images: int, seconds: float) -> str:
    cmd = shlex.join(["python", "scripts/model_coverage.py", *(a for a in argv if a != "--resume")])
    lines = [
        "# Coverage: torchvision classification models",
        "",
        f"Generated by `{cmd}` ({seconds / 60:.0f} min of model runs) on {platform.machine()} "
        f"({_threads()} in the last run; rows kept by --resume may come from earlier "
        f"ones; torch {torch.__version__}). Random weights "
        "(seed 0), BatchNorm statistics re-estimated on 256 Fashion-MNIST images upscaled "
        f"to 3 channels (64 px unless the size column says otherwise); {n_images} "
        "calibration and as many held-out images; LASSO, uniform split. Cells: the FLOPs "
        "ratio reached, and the relative logit error on the held-out images with the "
        "least-squares re-fit (bold) / without a re-fit; *max* is the largest ratio the "
        "prunable units allow. No accuracy: the weights are random (ConvNeXt's layer "
        "scales, 1e-6 at initialisation, are set to 1 so that its blocks count, and ViT's "
        "zero-initialised head gets random weights).",
        "",
        "| model | params (M) | px | units + samplers | layers left whole | 1.5× | 2× | "
        "why layers are left whole (most common) |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}" if "params" in r else "–"
        if "refused" in r:
            units = f"{r['units']} + {r['samplers']}" if "units" in r else "–"
            lines.append(
                f"| `{r['model']}` | {params} | {r['size']} | {units} | "
                f"{r.get('skipped', '–')} | refused | refused | "
                f"{r['refused'].replace('|', '/')} |"
            )
            continue
        lines.append(
            f"| `{r['model']}` | {params} | {r['size']} | {r['units']} + {r['samplers']} | "
            f"{r['skipped']} | {_cell(r, 1.5)} | {_cell(r, 2.0)} | "
            f"{r['skip_summary'].replace('|', '/')} |"
        )
    pruned = [r for r in rows if r.get("2x_lstsq", {}).get("speedup")]
    better = [r for r in pruned if r["2x_lstsq"]["error"] < r["2x_none"]["error"]]
    lines += [
        "",
        f"{len([r for r in rows if 'refused' not in r])} of {len(rows)} models prune; "
        f"{len(pruned)} reach 2×, and at 2× the re-fit lowers the held-out logit error in "
        f"{len(better)} of them.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(FAMILIES), help="comma-separated names, or 'all'"
    )
    parser.add_argument("--images", type=int, default=32, help="calibration images (32)")
    parser.add_argument("--max-params", type=float, default=MAX_PARAMS / 1e6, help="in M")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    parser.add_argument("--quick", action="store_true", help="two small models, 16 images")
    parser.add_argument("--resume", action="store_true", help="keep the rows already written")
    args = parser.parse_args(argv)
    if args.models == "all":
        import torchvision

        names = sorted(torchvision.models.list_models(module=torchvision.models))
    else:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args.quick:
        names, args.images = list(QUICK), 16
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = args.out_dir / "coverage.jsonl"
    done = {}
    if args.resume and jsonl.exists():
        done = {r["model"]: r for r in map(json.loads, jsonl.read_text("utf-8").splitlines())}
    elif jsonl.exists():
        jsonl.unlink()
    rows = []
    for name in names:
        if name in done:
            rows.append(done[name])
            continue
        try:
            row = run_model(name, args.images, max_params=args.max_params * 1e6)
        except Exception:  # recorded: the table must still be written
            row = {"model": name, "size": SIZE.get(name, 64), "refused": "crashed (see log)"}
            traceback.print_exc()
        rows.append(row)
        with jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row.get('refused') or {k: v for k, v in row.items() if 'x_' in k}}")
    path = args.out_dir / "coverage.md"
    seconds = sum(r.get("seconds", 0.0) for r in rows)  # over resumed runs too
    path.write_text(markdown(rows, argv, args.images, seconds), "utf-8")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
