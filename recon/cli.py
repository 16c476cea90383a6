"""Command line: ``recon prune``, ``eval``, ``bench``, ``finetune`` (also ``python -m recon``)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import _finetune_cli
from ._version import __version__
from .distributed import (
    DistributedError,
    RankFailedError,
    join_torchrun,
    leave_torchrun,
    torchrun_world_size,
)
from .loading import BUILTIN_DATA, load_data, load_model, torchvision_weights_name
from .solve import RECONSTRUCT

__all__ = ["BUILTIN_DATA", "build_parser", "load_data", "load_model", "main"]

_DIST_ERRORS = (DistributedError, RankFailedError)  # another process failed: no traceback
# recon.select.METHODS, spelled out: importing recon.select would load scikit-learn
# for every command (tests/test_seed_systems.py checks the two agree)
_METHODS = ("obs", "lasso", "thinet", "l1", "max_response", "apoz", "bn_gamma", "first_k", "random")

_EPILOG = """\
examples:
  recon prune                                   # embedded default: shipped VGG-16, 2x
  recon prune --model pretrained:resnet20_fmnist --data fmnist --speedup 2
  recon prune --model torchvision:resnet50 --weights IMAGENET1K_V2 --data photos/ \\
              --max-images 512 --speedup 2 --out resnet50_small.pt --report report.json
  recon prune --model torchvision:vgg16_bn --weights vgg16_bn.pth \\
              --data calib.pt --speedup 4 --out vgg16_small.pt
  recon prune --model mypkg.nets:make_vgg --weights net.pt --data calib.npy \\
              --method thinet --keep-ratio 0.5 --ignore features.0
  recon prune --model torchvision:resnet50 --weights resnet50.pth --data calib.pt \\
              --speedup 2 --no-sampler-layers --out resnet50_small.pt
  recon prune --model pretrained:vgg16_fmnist --data fmnist --out vgg_small.pt
  recon eval --model pretrained:vgg16_fmnist --weights vgg_small.pt   # a recon file
  recon finetune --model pretrained:vgg16_fmnist --weights vgg_small.pt --out tuned.pt
  torchrun --nproc_per_node=2 -m recon prune --model pretrained:vgg16_fmnist --data fmnist
                                                # calibration split over 2 processes
  recon bench                                   # time and memory of the default 2x run
"""


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc


def _samples(text: str) -> int | None:
    if text.lower() in ("all", "none"):
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an int or 'all', got {text!r}") from exc


def _name_values(text: str, kind: type) -> dict[str, Any]:
    """``a=1,b=2`` or a JSON file path -> dict."""
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            return {str(k): kind(v) for k, v in json.load(f).items()}
    out = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE pairs, got {part!r}")
        out[name.strip()] = kind(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recon",
        description="Reconstruction-based channel pruning: make a trained CNN thinner in one "
        "shot from unlabeled calibration images (OBS, LASSO or ThiNet selection, "
        "least-squares re-fitting), and fine-tune it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"recon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "prune",
        help="prune a model (with no --model and no --data: the embedded default demo)",
        description="Prune a model's channels in one shot. With neither --model nor --data, "
        "runs the embedded default: the shipped VGG-16 trained on Fashion-MNIST, pruned 2x "
        "by LASSO and by ThiNet from the 1,000 embedded calibration images.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        metavar="SPEC",
        help="'pretrained:NAME' (a shipped model: vgg16_fmnist, resnet20_fmnist), "
        "'torchvision:NAME' (e.g. torchvision:vgg16_bn), 'package.module:factory' "
        "(a callable returning an nn.Module), or a file holding a whole pickled module "
        "(read only with --unsafe-pickle)",
    )
    _add_weights(g)
    g.add_argument(
        "--data",
        metavar="SPEC",
        help="calibration images: a folder of image files (JPEG, PNG, ...; searched "
        "recursively, an ImageFolder tree works, labels are ignored), a .pt file (a tensor "
        "(N,C,H,W), an (inputs, labels) pair or a dict with 'inputs'), a .npy array, or a "
        "built-in set: fmnist (the 1,000 embedded Fashion-MNIST calibration images), digits",
    )
    g.add_argument(
        "--max-images",
        type=int,
        metavar="N",
        help="use at most N calibration images (of a folder: a random subset, seeded by --seed)",
    )
    g.add_argument("--batch-size", type=int, default=64, help="calibration batch size (64)")
    _add_image_args(g)
    _add_unsafe_pickle(g)

    t = p.add_argument_group("target (exactly one)")
    tx = t.add_mutually_exclusive_group()
    tx.add_argument(
        "--speedup", type=_positive_float, help="FLOPs ratio original/pruned, e.g. 2 or 4"
    )
    tx.add_argument(
        "--keep-ratio",
        metavar="R | NAME=R,...",
        help="fraction of channels kept: one float in (0, 1] for every layer, or per layer",
    )
    tx.add_argument(
        "--channels",
        metavar="NAME=N,... | FILE.json",
        help="channels kept per layer (layer = producer conv's qualified name, or "
        "CONV.sampler for a residual branch's sampler layer)",
    )
    t.add_argument(
        "--allocation",
        choices=("uniform", "auto", "global", "global_normalized"),
        default=None,
        help="how --speedup is split over the layers: measured from the calibration data "
        "(auto, the default: profiles the network first, which about doubles the run "
        "time), one keep ratio for all (uniform), or one ranking of every channel's "
        "score across the layers (global: Network Slimming's threshold, for the score "
        "methods l1, max_response, apoz, bn_gamma; global_normalized: each layer's scores "
        "divided by their mean first)",
    )
    t.add_argument(
        "--min-keep",
        type=float,
        default=0.25,
        metavar="F",
        help="with --allocation global or global_normalized: the share of its channels "
        "every layer keeps whatever its scores (default 0.25; 0: none, as Network Slimming)",
    )

    m = p.add_argument_group("method")
    m.add_argument(
        "--method",
        default="obs",
        choices=_METHODS,
        help="channel selection (default: obs, greedy removal on the re-fitted least-squares "
        "error; lasso: He et al. 2017; thinet: Luo et al. 2017; "
        "apoz: fewest zeros after the ReLU, Hu et al. 2016; bn_gamma: largest BatchNorm "
        "|gamma|, Network Slimming, Liu et al. 2017)",
    )
    m.add_argument(
        "--reconstruct",
        default="lstsq",
        choices=RECONSTRUCT,
        help="re-fit of the next layer: least squares with bias and a ridge towards a safe "
        "fit, chosen per layer by cross-validation over the calibration images (lstsq, "
        "default); plain least squares (lstsq_plain); ThiNet per-channel scaling (scale); "
        "or none",
    )
    m.add_argument(
        "--samples-per-image",
        type=_samples,
        default=10,
        metavar="N|all",
        help="output positions sampled per image and layer (default 10; 'all' for every one)",
    )
    m.add_argument(
        "--sampler-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="residual nets: put sampler layers in front of each branch so it reads only "
        "some of the block's input channels (default: on)",
    )
    m.add_argument(
        "--block-target",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="residual nets: re-fit each branch's last conv against the block's sum, "
        "compensating the shortcut's error (default: on)",
    )
    m.add_argument("--ignore", default="", metavar="NAME,...", help="layers never pruned")
    m.add_argument("--round-to", type=int, default=1, help="round channel counts to a multiple")
    m.add_argument("--seed", type=int, default=0, help="seed for position sampling (0)")
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: where the model is)")
    _add_stats_options(m)

    d = p.add_argument_group(
        "distributed (under torchrun)",
        "Launched by torchrun (which sets RANK and WORLD_SIZE), every process loads the same "
        "model and data, takes its share of the calibration images, and the statistics are "
        "summed over processes; all end with the same model, which rank 0 reports and "
        "writes. The backend is nccl with --device cuda (each process on cuda:LOCAL_RANK "
        "unless the device names a GPU), "
        "gloo otherwise.",
    )
    d.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=1800.0,
        metavar="SECONDS",
        help="how long a process waits for the others before giving up with an error (1800)",
    )

    r = p.add_argument_group("label-free recovery")
    r.add_argument(
        "--recover",
        type=int,
        default=0,
        metavar="STEPS",
        help="after pruning, train the pruned model for STEPS steps to the original's "
        "outputs on the calibration images (no labels; recon.recover). A quarter of the "
        "images is held out, and the one-shot model is kept unless the held-out output "
        "error drops. 300 is a good start; 0 (default): none",
    )

    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        metavar="PATH",
        help="save the pruned model here: a recon file (the pruning plan and the weights, "
        "read back with --model SPEC --weights PATH, or recon.load) unless --out-format module",
    )
    o.add_argument(
        "--out-format",
        choices=("recon", "module"),
        default="recon",
        help="recon (default): plan + state_dict, plain data that loads without running code; "
        "module: the whole pickled nn.Module (torch.save(model)), which only loads with "
        "--unsafe-pickle / torch.load(weights_only=False) and breaks when its class moves",
    )
    o.add_argument("--report", metavar="PATH", help="write the report as JSON here")
    o.add_argument(
        "--quiet",
        action="store_true",
        help="no progress output (bars at a terminal, lines in a log)",
    )

    e = sub.add_parser(
        "eval",
        help="top-1 accuracy of a model on a labeled built-in set",
        description="Print the top-1 accuracy of a model on a labeled data set.",
    )
    e.add_argument("--model", required=True, metavar="SPEC", help="as for 'recon prune'")
    _add_weights(e)
    e.add_argument(
        "--data",
        default="fmnist",
        help="built-in set: fmnist (2,000 embedded Fashion-MNIST test images, default) or digits",
    )
    _add_unsafe_pickle(e)
    _finetune_cli.add_parser(sub, _add_weights, _add_unsafe_pickle)
    b = sub.add_parser(
        "bench",
        help="time and peak memory of one pruning run, against one plain forward pass",
        description="Prune a model once and print the time of each phase (forward passes, "
        "statistics, selection, solves, surgery), the peak memory, and the total in units "
        "of one plain forward pass of the calibration set through the original model, "
        "measured in the same run. Defaults: the shipped VGG-16 on the 1,000 embedded "
        "Fashion-MNIST images, 10 positions per image, 2x. scripts/bench.py adds the naive "
        "reference, scaling runs and latency.",
    )
    b.add_argument(
        "--model",
        default="pretrained:vgg16_fmnist",
        metavar="SPEC",
        help="as for 'recon prune' (default: pretrained:vgg16_fmnist)",
    )
    _add_weights(b)
    b.add_argument(
        "--data",
        default="fmnist",
        metavar="SPEC",
        help="as for 'recon prune' (default: fmnist); a folder's images are all decoded and "
        "held at once (3*H*W*4 bytes each), so keep --max-images moderate",
    )
    b.add_argument(
        "--max-images",
        type=int,
        default=1000,
        metavar="N",
        help="calibration images (default 1000)",
    )
    b.add_argument("--batch-size", type=int, default=64, help="calibration batch size (64)")
    b.add_argument("--speedup", type=_positive_float, default=2.0, help="FLOPs target (2)")
    b.add_argument(
        "--method",
        default="lasso",
        choices=_METHODS,
        help="channel selection (default: lasso)",
    )
    b.add_argument(
        "--reconstruct",
        default="lstsq",
        choices=RECONSTRUCT,
        help="re-fit, as for 'recon prune' (default: lstsq)",
    )
    b.add_argument(
        "--allocation",
        default="uniform",
        choices=("uniform", "auto", "global", "global_normalized"),
        help="split of --speedup, as for 'recon prune' (default here: uniform, the split the "
        "published timings use; auto adds its profile phase)",
    )
    b.add_argument(
        "--samples-per-image",
        type=_samples,
        default=10,
        metavar="N|all",
        help="output positions sampled per image and layer (default 10)",
    )
    b.add_argument("--device", help="cpu, cuda, ... (default: where the model is)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    b.add_argument("--repeats", type=int, default=3, help="forward passes timed (median; 3)")
    b.add_argument(
        "--passes",
        default="single",
        choices=("single", "double"),
        help="the pruned network's passes: single (default) continues each unit from the "
        "cached consumer input; double is the older scheme that runs each producer twice, "
        "kept for comparison",
    )
    _add_stats_options(b)
    b.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    _add_image_args(b)
    _add_unsafe_pickle(b)
    return parser


def _add_weights(group: Any) -> None:
    group.add_argument(
        "--weights",
        metavar="PATH|NAME",
        help="weights for --model: a state_dict file, or a recon file (written by --out or "
        "recon.save: its pruning plan is applied to the model first); read with "
        "torch.load(weights_only=True). For torchvision models also a weights name such as "
        "DEFAULT or IMAGENET1K_V1 (downloads them)",
    )


def _add_unsafe_pickle(group: Any) -> None:
    group.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="also read --model/--weights/--data files that hold pickled Python objects "
        "(a whole saved module, a checkpoint with other objects, a NumPy object array). "
        "Unpickling runs code chosen by whoever made the file: only for files you trust. "
        "Without it such files are refused",
    )


def _add_image_args(group: Any) -> None:
    group.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="--data FOLDER: resize and center crop images to PX (default 224) and normalise "
        "with the ImageNet mean/std; when --weights names torchvision weights, their own "
        "transforms are used instead",
    )
    group.add_argument(
        "--strict",
        action="store_true",
        help="--data FOLDER: stop with an error at a file that cannot be decoded (default: "
        "skip it and count it in the report)",
    )


def _add_stats_options(group: Any) -> None:
    group.add_argument(
        "--block-dtype",
        choices=("float32", "float64"),
        default="float64",
        help="precision of each block of the statistics' products; the sums are float64 "
        "either way (default float64; float32: faster, for ample calibration data)",
    )
    group.add_argument(
        "--cache-mb",
        type=float,
        default=1024.0,
        metavar="MB",
        help="memory (MiB) for activations kept between layers: the original network's "
        "sampled outputs, then the pruned network's activations at the current layer; "
        "0 recomputes everything from the input (same result, slower). Default 1024",
    )


def _cache_bytes(args: argparse.Namespace) -> int:
    if not args.cache_mb >= 0:
        raise ValueError(f"The '--cache-mb' must be >= 0. Got {args.cache_mb} instead.")
    return int(args.cache_mb * 2**20)


# --------------------------------------------------------------------------- loading


def _image_batches(args: argparse.Namespace, max_images: int | None) -> Any:
    """The --data folder as a recon.images.ImageFolderBatches, with the model's preprocessing."""
    from .images import ImageFolderBatches, imagenet_transform, torchvision_transform

    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"The '--image-size' must be >= 1. Got {args.image_size} instead.")
    tv_weights = torchvision_weights_name(args.model or "", args.weights)
    if tv_weights is not None:
        transform = torchvision_transform(args.model.split(":", 1)[1], tv_weights)
        if args.image_size is not None:
            print(
                f"--image-size {args.image_size} ignored: the torchvision weights "
                f"{tv_weights} come with their own transforms",
                file=sys.stderr,
            )
    else:
        transform = imagenet_transform(args.image_size or 224)
    return ImageFolderBatches(
        args.data,
        transform=transform,
        batch_size=args.batch_size,
        max_images=max_images,
        seed=getattr(args, "seed", 0),
        strict=args.strict,
    )


def _check_out(path: str | None) -> None:
    """Refuse an --out that cannot be written before any work is done."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"The '--out' must name a file. Got the folder '{path}' instead.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"The '--out' folder '{folder}' does not exist.")


# --------------------------------------------------------------------------- commands


def _run_default(args: argparse.Namespace) -> int:
    from . import prune
    from .data import evaluate, load_embedded
    from .models import pretrained

    print(
        "recon embedded default: the shipped VGG-16 (quarter width, trained on "
        "Fashion-MNIST), pruned 2x by recon's default (obs) and by LASSO (He et al.) "
        "from 1,000 unlabeled images."
    )
    model = pretrained("vgg16_fmnist")
    x_calib, _, x_eval, y_eval = load_embedded()
    base = evaluate(model, x_eval, y_eval)
    rows = []
    for method in ("obs", "lasso"):
        result = prune(
            model,
            x_calib.split(args.batch_size),
            method=method,
            speedup=args.speedup or 2.0,
            samples_per_image=args.samples_per_image,
            seed=args.seed,
            cache_bytes=_cache_bytes(args),
            block_dtype=args.block_dtype,
            progress=not args.quiet,
        )
        print()
        print(result.report)
        rows.append((method, result.report.speedup, evaluate(result.model, x_eval, y_eval)))
    print(f"\ntop-1 accuracy on {len(y_eval)} held-out Fashion-MNIST test images (no fine-tuning)")
    print(f"  original           {100 * base:6.2f}%")
    for method, speed, acc in rows:
        print(f"  {method:<7} {speed:4.2f}x    {100 * acc:6.2f}%  ({100 * (acc - base):+.2f})")
    return 0


@contextlib.contextmanager
def _distributed(args: argparse.Namespace) -> Iterator[int]:
    """Join the process group torchrun describes (if any); yield this process's rank.

    Ranks other than 0 print nothing on stdout and write no files.
    """
    if torchrun_world_size() <= 1 or not torch.distributed.is_available():
        yield 0
        return
    if not args.dist_timeout > 0:
        raise ValueError(f"The '--dist-timeout' must be > 0. Got {args.dist_timeout} instead.")
    device, owner = join_torchrun(args.device, timeout=args.dist_timeout)
    args.device = None if device is None else str(device)
    rank = torch.distributed.get_rank()
    ok = False
    try:
        if rank == 0:
            yield rank
        else:
            args.quiet = True
            args.out = args.report = None
            with contextlib.redirect_stdout(io.StringIO()):
                yield rank
        ok = True
    finally:
        leave_torchrun(owner, ok)


def _cmd_prune(args: argparse.Namespace) -> int:
    with _distributed(args):
        return _prune_command(args)


def _prune_command(args: argparse.Namespace) -> int:
    from . import prune
    from .data import evaluate

    if args.model is None and args.data is None:
        return _run_default(args)
    if args.model is None or args.data is None:
        raise ValueError("'recon prune' needs both --model and --data (or neither, for the demo)")
    if args.batch_size < 1:
        raise ValueError(f"The '--batch-size' must be >= 1. Got {args.batch_size} instead.")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"The '--max-images' must be >= 1. Got {args.max_images} instead.")
    if args.recover < 0:
        raise ValueError(f"The '--recover' must be >= 0 steps. Got {args.recover} instead.")
    _check_out(args.out)
    model = load_model(args.model, args.weights, unsafe_pickle=args.unsafe_pickle)
    folder = None
    if os.path.isdir(args.data):
        folder = _image_batches(args, args.max_images)  # decoded batch by batch
        calib: Any = folder
        x = labels = None
    else:
        x, labels = load_data(args.data, unsafe_pickle=args.unsafe_pickle)
        calib = x.split(args.batch_size)
    target: dict[str, Any] = {}
    if args.speedup is not None:
        target["speedup"] = args.speedup
    elif args.keep_ratio is not None:
        try:
            target["keep_ratio"] = float(args.keep_ratio)
        except ValueError:
            target["keep_ratio"] = _name_values(args.keep_ratio, float)
    elif args.channels is not None:
        target["channels"] = _name_values(args.channels, int)
    else:
        target["speedup"] = 2.0
        print("no target given: using --speedup 2", file=sys.stderr)
    result = prune(
        model,
        calib,
        method=args.method,
        reconstruct=args.reconstruct,
        samples_per_image=args.samples_per_image,
        max_images=args.max_images,
        ignored_layers=[s for s in args.ignore.split(",") if s],
        round_to=args.round_to,
        sampler_layers=args.sampler_layers,
        block_target=args.block_target,
        seed=args.seed,
        device=args.device,
        cache_bytes=_cache_bytes(args),
        block_dtype=args.block_dtype,
        progress=not args.quiet,
        allocation=args.allocation,
        min_keep=args.min_keep,
        **target,
    )
    if args.recover:
        from .recovery import recover

        result = recover(
            result, model, calib, steps=args.recover, seed=args.seed,
            max_images=args.max_images, progress=not args.quiet,
        ).result  # fmt: skip
    print(result.report)
    if folder is not None:
        print(f"\ncalibration: {folder.summary()}")
    if labels is not None and args.data in BUILTIN_DATA:
        print(
            f"\naccuracy on {args.data}: {100 * evaluate(model, x, labels):.2f}% -> "
            f"{100 * evaluate(result.model, x, labels):.2f}% (calibration images)"
        )
    if args.report:
        report = result.report.to_dict()
        if folder is not None:
            report["calibration"] = folder.to_dict()
        with open(args.report, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        print(f"report written to {args.report}")
    if args.out:
        _write_out(result, args)
    return 0


def _write_out(result: Any, args: argparse.Namespace) -> None:
    if args.out_format == "module":
        from .io import _write_atomic

        _write_atomic(result.model, args.out)  # the whole pickled module
        print(
            f"pruned model written to {args.out} (a whole pickled module: torch.load(path, "
            "weights_only=False) or --model PATH --unsafe-pickle read it; only trust it "
            "where you made it)"
        )
        return
    from .io import save

    save(result, args.out)
    again = f"--model {args.model} --weights {args.out}"
    if args.unsafe_pickle and os.path.isfile(args.model):
        again += " --unsafe-pickle"
    print(
        f"pruned model written to {args.out} (plan + weights; read it back with {again}, "
        "or recon.load(path, build_unpruned_model) in Python)"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"The '--threads' must be >= 1. Got {args.threads} instead.")
        torch.set_num_threads(args.threads)
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"The '--max-images' must be >= 1. Got {args.max_images} instead.")
    if args.batch_size < 1:
        raise ValueError(f"The '--batch-size' must be >= 1. Got {args.batch_size} instead.")
    model = load_model(args.model, args.weights, unsafe_pickle=args.unsafe_pickle)
    if os.path.isdir(args.data):  # bench times forward passes over one tensor
        x = torch.cat(list(_image_batches(args, args.max_images)))
    else:
        x, _ = load_data(args.data, unsafe_pickle=args.unsafe_pickle)
    x = x[: args.max_images]
    result, _ = bench.run(
        model,
        x,
        name=args.model,
        speedup=args.speedup,
        method=args.method,
        reconstruct=args.reconstruct,
        allocation=args.allocation,
        samples_per_image=args.samples_per_image,
        batch_size=args.batch_size,
        cache_bytes=_cache_bytes(args),
        block_dtype=args.block_dtype,
        device=args.device,
        repeats=args.repeats,
        single_pass=args.passes == "single",
    )
    print(result.to_text())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result.to_dict(), fh, indent=2)
        print(f"numbers written to {args.json}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import evaluate, load_digits_split, load_embedded

    model = load_model(args.model, args.weights, unsafe_pickle=args.unsafe_pickle)
    if args.data == "fmnist":
        _, _, x, y = load_embedded()
        what = f"{len(y)} embedded Fashion-MNIST evaluation images"
    elif args.data == "digits":
        _, _, x, y = load_digits_split()
        what = "the digits test split"
    else:
        raise ValueError(
            f"The '--data' of 'recon eval' must be one of {BUILTIN_DATA}. Got {args.data!r}."
        )
    print(f"top-1 accuracy on {what}: {100 * evaluate(model, x, y):.2f}%")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        commands = {
            "prune": _cmd_prune,
            "eval": _cmd_eval,
            "bench": _cmd_bench,
            "finetune": lambda a: _finetune_cli.run(a, _check_out),
        }
        return commands[args.command](args)
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        if isinstance(exc, RuntimeError) and not isinstance(exc, _DIST_ERRORS):
            raise
        ranked = torchrun_world_size() > 1 and "RANK" in os.environ
        where = f" [rank {os.environ['RANK']}]" if ranked else ""
        print(f"recon {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
