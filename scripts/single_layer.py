"""Single-layer analysis in the style of He et al. 2017, Fig. 3: prune one conv layer of
a shipped model at a time, by several channel selection methods, and measure how much
test accuracy drops and how well the next layer is reconstructed.

For each chosen layer of width ``c`` and each channel reduction factor ``s``, only that
layer keeps ``round(c / s)`` channels (``recon.prune(..., channels={layer: k})``), its
consumer is re-fitted (``--reconstruct``, least squares by default), and the network is
evaluated without fine-tuning. Writes ``<out-dir>/single_layer.png`` (one panel per
layer: accuracy drop against reduction factor, one line per method) and
``<out-dir>/single_layer.md`` (the numbers and the command).

    python scripts/single_layer.py                       # docs/single_layer.{png,md}
    python scripts/single_layer.py --quick --out-dir /tmp/quick     # smoke test
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon._progress import progress_bar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args

import recon
from recon.data import evaluate, load_embedded, load_fashion_mnist, to_tensor32
from recon.graph import find_units
from recon.models import pretrained, pretrained_names
from recon.select import METHODS
from recon.solve import RECONSTRUCT

DEFAULT_METHODS = ("first_k", "max_response", "thinet", "lasso")
DEFAULT_FACTORS = (1.0, 2.0, 3.0, 4.0, 5.0)
N_LAYERS = 4  # default: this many units spread evenly over depth
QUICK = {"calib": 128, "n_eval": 300, "speedups": (1.0, 2.0)}


# --------------------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="vgg16_fmnist", help="shipped model to analyse (vgg16_fmnist)"
    )
    parser.add_argument(
        "--layers",
        type=lambda s: tuple(n.strip() for n in s.split(",") if n.strip()),
        help=f"units to prune, one at a time (default: {N_LAYERS} spread over depth; the "
        "first and last of them with --quick)",
    )
    parser.add_argument(
        "--speedups",
        type=_args.ratios("channel reduction factors", "1,2,3,4,5", sort=True),
        help="channel reduction factors of the layer (1,2,3,4,5; 1,2 with --quick)",
    )
    parser.add_argument(
        "--methods",
        type=_args.names(METHODS, "methods"),
        default=DEFAULT_METHODS,
        help=f"channel selection methods ({','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--reconstruct", choices=RECONSTRUCT, default="lstsq", help="re-fitting (lstsq)"
    )
    parser.add_argument(
        "--data",
        choices=("embedded", "fmnist"),
        default="embedded",
        help="embedded: the shipped subset (1,000 calibration and 2,000 evaluation images "
        "of the test split, offline); fmnist: calibration from the train split, "
        "evaluation on the test split (embedded)",
    )
    parser.add_argument(
        "--calib", type=_args.int_at_least(1), help="calibration images (1000; 128 with --quick)"
    )
    parser.add_argument(
        "--n-eval",
        type=_args.int_at_least(1),
        help="evaluation images (all of the chosen data; 300 with --quick)",
    )
    parser.add_argument("--seed", type=_args.int_at_least(0), default=0, help="seed (0)")
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu)")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("docs"), help="where the outputs go (docs/)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 layers, factors 1,2, 128 calibration and 300 evaluation images",
    )
    return parser


def default_layers(model: torch.nn.Module, n: int = N_LAYERS) -> list[str]:
    """``n`` conv units of ``model`` evenly spread from the first to the last."""
    names = [u.name for u in find_units(model).units if u.kind != "sampler"]
    picks = np.unique(np.round(np.linspace(0, len(names) - 1, min(n, len(names)))).astype(int))
    return [names[i] for i in picks]


def _data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Calibration images, evaluation images and labels, and a sentence saying which."""
    g = torch.Generator().manual_seed(args.seed)
    if args.data == "embedded":
        x_calib, _, x_eval, y_eval = load_embedded()  # each set already in a seeded order
        x_calib, x_eval, y_eval = (
            x_calib[: args.calib],
            x_eval[: args.n_eval],
            y_eval[: args.n_eval],
        )
        text = (
            f"the embedded Fashion-MNIST subset (`recon.data.load_embedded`): {len(x_calib)} "
            f"calibration and {len(y_eval)} evaluation images, disjoint, from the test split"
        )
        return x_calib, x_eval, y_eval, text
    images, _ = load_fashion_mnist("train")
    x_train = to_tensor32(images)
    x_calib = x_train[torch.randperm(len(x_train), generator=g)[: args.calib]]
    images, labels = load_fashion_mnist("test")
    x_eval, y_eval = to_tensor32(images), torch.from_numpy(labels)
    if args.n_eval is not None and args.n_eval < len(y_eval):
        idx = torch.randperm(len(y_eval), generator=g)[: args.n_eval].sort().values
        x_eval, y_eval = x_eval[idx], y_eval[idx]
    text = (
        f"Fashion-MNIST: {len(x_calib)} calibration images drawn with seed {args.seed} from "
        f"the train split, {len(y_eval)} evaluation images of the test split"
    )
    return x_calib, x_eval, y_eval, text


# --------------------------------------------------------------------------- output


def _plot(results, layers, widths, args, base: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install recon[plot])", file=sys.stderr)
        return False
    ncols = min(len(layers), 4)
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows), squeeze=False, sharey=True
    )
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    for ax, layer in zip(axes.flat, layers, strict=False):
        for method in args.methods:
            rows = [r for r in results if r["layer"] == layer and r["method"] == method]
            ax.plot(
                [r["factor"] for r in rows],
                [100 * r["drop"] for r in rows],
                marker="o",
                markersize=3,
                color=colors[method],
                label=method,
            )
        ax.set_title(f"{layer} ({widths[layer]} channels)", fontsize=9)
        ax.set_xlabel("channel reduction factor")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy drop (points)")
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"{args.model}: one layer pruned, reconstruct={args.reconstruct}, no fine-tuning "
        f"(original {100 * base:.2f}%)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _err(x: float) -> str:
    return f"{x:.3f}" if x == 0 or not math.isfinite(x) or x >= 1e-3 else f"{x:.1e}"


def _markdown(results, layers, widths, args, argv, base, data_text, seconds, warned) -> str:
    factors = args.speedups
    lines = [
        f"# Single-layer pruning of {args.model} (He et al. 2017, Fig. 3)",
        "",
        f"One layer at a time keeps round(width / s) channels, chosen by each method; its "
        f"consumer is re-fitted with reconstruct={args.reconstruct}; no fine-tuning. "
        f"Data: {data_text}. Original accuracy: {100 * base:.2f}%.",
        "",
        f"- Machine: {platform.platform()}, {torch.get_num_threads()} threads, device "
        f"{args.device}, torch {torch.__version__}, recon {recon.__version__}; seed "
        f"{args.seed}; {seconds:.0f} s.",
        f"- Command: `python scripts/single_layer.py {shlex.join(argv)}`.",
        "",
        "Each cell: accuracy drop in percentage points · relative reconstruction error "
        "‖Y − Ŷ‖² / ‖Y‖² of the consumer's output after re-fitting (calibration data).",
        "",
        "| layer | method | " + " | ".join(f"s = {s:g}" for s in factors) + " |",
        "|---|---|" + "---:|" * len(factors),
    ]
    by = {(r["layer"], r["method"], r["factor"]): r for r in results}
    for layer in layers:
        for method in args.methods:
            cells = []
            for s in factors:
                r = by[(layer, method, s)]
                cells.append(f"{100 * r['drop']:.2f} · {_err(r['error_after'])}")
            name = f"{layer} ({widths[layer]})"
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    if warned:
        lines += ["", f"{warned} of {len(results)} runs warned (e.g. under-determined re-fits)."]
    if (args.out_dir / "single_layer.png").exists():
        lines += ["", "![single-layer analysis](single_layer.png)"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    for key, default in (("calib", 1000), ("n_eval", None), ("speedups", DEFAULT_FACTORS)):
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else default)
    shipped = pretrained_names()
    if args.model not in shipped:
        parser.error(f"argument --model: must be one of {shipped}. Got {args.model!r} instead.")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"argument --device: not a torch device: {args.device!r}.")

    net = pretrained(args.model).to(args.device)
    graph = find_units(net)
    widths = {u.name: u.width for u in graph.units}
    if args.layers is None:
        layers = default_layers(net)
        if args.quick:
            layers = [layers[0], layers[-1]]
    else:
        layers = list(args.layers)
        bad = [n for n in layers if n not in widths]
        if bad:
            parser.error(
                f"argument --layers: {bad} are not units of {args.model}; choose from "
                f"{graph.names}."
            )
    print("layers: " + ", ".join(f"{n} ({widths[n]} channels)" for n in layers))

    x_calib, x_eval, y_eval, data_text = _data(args)
    base = evaluate(net, x_eval, y_eval)
    print(f"{args.model}: original accuracy {100 * base:.2f}% on {len(y_eval)} images")

    runs = [(layer, m, s) for layer in layers for m in args.methods for s in args.speedups]
    results: list[dict[str, Any]] = []
    warned = 0
    for layer, method, s in progress_bar(runs, desc="runs", unit="run"):
        k = max(1, round(widths[layer] / s))
        row = {"layer": layer, "method": method, "factor": s, "channels": k}
        if k >= widths[layer]:  # nothing removed: the original network
            results.append(row | {"drop": 0.0, "error_before": 0.0, "error_after": 0.0})
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = recon.prune(
                net,
                x_calib.split(100),
                method=method,
                reconstruct=args.reconstruct,
                channels={layer: k},
                seed=args.seed,
                device=args.device,
                progress=False,
            )
        warned += bool(caught)
        (lr,) = [r for r in res.report.layers if r.name == layer]
        acc = evaluate(res.model, x_eval, y_eval)
        results.append(
            row
            | {"drop": base - acc, "error_before": lr.error_before, "error_after": lr.error_after}
        )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    _plot(results, layers, widths, args, base, args.out_dir / "single_layer.png")
    text = _markdown(
        results,
        layers,
        widths,
        args,
        argv,
        base,
        data_text,
        time.perf_counter() - t_start,
        warned,
    )
    (args.out_dir / "single_layer.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
