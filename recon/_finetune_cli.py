"""``recon finetune``: train a (pruned) model on a built-in labeled set, from the shell.

One command for the training steps of the systems recon is compared with: fine-tuning
after pruning (optionally distilled from the original), Network Slimming's sparsity
training (``--bn-l1``), and Rethinking's scratch baselines (``--reinit SEED``: the same
architecture with fresh weights). The work is :func:`recon.finetune.finetune` and
:func:`recon.reinit`; this module only reads the arguments, the model and the data, and
writes the result.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

__all__ = ["add_parser", "run"]

_EXAMPLES = """\
examples:
  recon prune --model pretrained:vgg16_fmnist --data fmnist --out small.pt
  recon finetune --model pretrained:vgg16_fmnist --weights small.pt --out tuned.pt
  recon finetune --model pretrained:vgg16_fmnist --weights small.pt --out tuned.pt \\
                 --teacher pretrained:vgg16_fmnist          # distilled from the original
  recon finetune --model pretrained:vgg16_fmnist --weights small.pt --out scratch.pt \\
                 --reinit 0 --steps 11232 --lr 0.05         # Scratch-E (24 epochs)
  recon finetune --model pretrained:vgg16_fmnist --bn-l1 1e-4 --steps 3000 \\
                 --out sparse.pt                            # Slimming's sparsity training
  recon eval --model pretrained:vgg16_fmnist --weights tuned.pt
"""


def add_parser(sub: Any, add_weights, add_unsafe_pickle) -> None:
    """The ``finetune`` subcommand, on the CLI's subparsers ``sub``."""
    f = sub.add_parser(
        "finetune",
        help="train a (pruned) model on a built-in labeled set: fine-tuning, distillation, "
        "sparsity training, scratch baselines",
        description="Train a model for --steps SGD steps (momentum 0.9, weight decay 5e-4, "
        "cosine learning rate from --lr, shifts and flips; recon.finetune.finetune) on a "
        "built-in labeled training set, print its top-1 accuracy before and after on the "
        "matching evaluation set, and write it to --out: a recon file (plan + weights) for "
        "a pruned model, a state_dict for an unpruned one; read either back with "
        "--model SPEC --weights OUT.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--model", required=True, metavar="SPEC", help="as for 'recon prune'")
    add_weights(f)
    f.add_argument(
        "--data",
        default="fmnist",
        choices=("fmnist", "digits"),
        help="training set: fmnist (the 60,000 Fashion-MNIST training images; the Debian "
        "package dataset-fashion-mnist or recon.data.load_fashion_mnist's cache), or "
        "digits (scikit-learn's, its training split). Default fmnist",
    )
    f.add_argument("--out", required=True, metavar="PATH", help="where the trained model goes")
    f.add_argument("--steps", type=int, default=300, help="SGD steps (default 300)")
    f.add_argument("--lr", type=float, default=0.01, help="peak learning rate (default 0.01)")
    f.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    f.add_argument(
        "--bn-l1",
        type=float,
        default=0.0,
        metavar="LAMBDA",
        help="add LAMBDA * sum|gamma| over every BatchNorm to the loss (Network Slimming's "
        "sparsity training; default 0)",
    )
    f.add_argument(
        "--teacher",
        metavar="SPEC",
        help="distil from this model's logits (the original, for a pruned --model); "
        "--teacher-weights as --weights",
    )
    f.add_argument("--teacher-weights", metavar="PATH|NAME", help="weights for --teacher")
    f.add_argument(
        "--distill",
        type=float,
        default=0.5,
        help="with --teacher: the distillation share of the loss (default 0.5)",
    )
    f.add_argument(
        "--temperature", type=float, default=4.0, help="with --teacher: its temperature (4)"
    )
    f.add_argument(
        "--reinit",
        type=int,
        metavar="SEED",
        help="first replace every weight by a fresh seeded initialisation (recon.reinit): "
        "train the architecture from scratch (Scratch-E/B of Liu et al. 2019)",
    )
    f.add_argument("--seed", type=int, default=0, help="seeds the batches (default 0)")
    f.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="save the training state to PATH every --checkpoint-every steps; the same "
        "command run again after an interruption continues from it (a file from other "
        "arguments is refused)",
    )
    f.add_argument(
        "--checkpoint-every", type=int, default=500, metavar="N", help="steps between saves (500)"
    )
    f.add_argument("--quiet", action="store_true", help="no progress output")
    add_unsafe_pickle(f)


def _data(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training images and labels, evaluation images and labels of a built-in set."""
    from .data import load_digits_split, load_embedded, load_fashion_mnist, to_tensor32

    if name == "digits":
        return load_digits_split()
    try:
        images, labels = load_fashion_mnist("train")
    except FileNotFoundError as exc:
        raise ValueError(
            f"The '--data fmnist' training split was not found ({exc}). Install the "
            "Debian package dataset-fashion-mnist, or download it once in Python with "
            "recon.data.load_fashion_mnist('train', download=True); or use --data digits."
        ) from exc
    _, _, x_eval, y_eval = load_embedded()
    return to_tensor32(images), torch.from_numpy(labels), x_eval, y_eval


def run(args: argparse.Namespace, check_out) -> int:
    """Run ``recon finetune``; ``check_out`` refuses an unwritable --out first."""
    from ._plan import plan_of
    from .data import evaluate
    from .finetune import finetune
    from .io import _write_atomic, save
    from .loading import load_model
    from .scratch import reinit

    check_out(args.out)
    for name, value, low in (
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--reinit", args.reinit, 0),
        ("--checkpoint-every", args.checkpoint_every, 1),
    ):
        if value is not None and value < low:
            raise ValueError(f"The '{name}' must be an int >= {low}. Got {value} instead.")
    if args.teacher_weights and not args.teacher:
        raise ValueError("The '--teacher-weights' need a '--teacher' model to apply to.")
    model = load_model(args.model, args.weights, unsafe_pickle=args.unsafe_pickle)
    teacher = None
    if args.teacher:
        teacher = load_model(args.teacher, args.teacher_weights, unsafe_pickle=args.unsafe_pickle)
    x, y, x_eval, y_eval = _data(args.data)
    if args.reinit is not None:
        model = reinit(model, args.reinit)
    before = evaluate(model, x_eval, y_eval)
    finetune(
        model,
        x,
        y,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        bn_l1=args.bn_l1,
        teacher=teacher,
        distill=args.distill if teacher is not None else 0.0,
        temperature=args.temperature,
        seed=args.seed,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )
    after = evaluate(model, x_eval, y_eval)
    where = "embedded Fashion-MNIST evaluation images" if args.data == "fmnist" else "digits test"
    print(f"top-1 on the {where}: {100 * before:.2f}% before, {100 * after:.2f}% after")
    if plan_of(model):
        save(model, args.out)  # a recon file: plan + weights
    else:
        _write_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.out)
    again = f"--model {args.model} --weights {args.out}"
    print(f"trained model written to {args.out} (read it back with {again})")
    return 0
