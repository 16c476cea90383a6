"""Train a shipped baseline on Fashion-MNIST and record it in recon/assets/pretrained.json.

    python scripts/train.py vgg16_fmnist --epochs 8
    python scripts/train.py resnet20_fmnist --epochs 8
    python scripts/train.py mobilenetv2_fmnist --epochs 6
    python scripts/train.py convnext_fmnist --epochs 3 --no-augment
    python scripts/train.py vgg16_fmnist --epochs 8 --bn-l1 1e-4   # -> vgg16_fmnist_bnl1

``--bn-l1 λ`` trains with Network Slimming's sparsity penalty ``λ Σ|γ|`` on every
BatchNorm scale (``recon.finetune.finetune(..., bn_l1=λ)``), the model to prune with
``method="bn_gamma", allocation="global"``; it is saved as ``<name>_bnl1`` so that the
shipped baseline is kept.

The checkpoint (float16 state_dict, loaded back as float32 by
``recon.models.pretrained``) goes to ``recon/assets/<name>.pt``; the manifest entry
records the builder, seed, epochs, test accuracy (of the float16 weights), sha256 and
this command. A progress bar with the running loss goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from recon.convnext import cifar_convnext
from recon.data import evaluate, load_fashion_mnist, to_tensor32
from recon.finetune import finetune
from recon.mobilenet import cifar_mobilenet_v2
from recon.models import PRETRAINED_MANIFEST, cifar_resnet20, cifar_resnet56, vgg16

MODELS = {
    # name: (builder name, kwargs, default lr)
    "vgg16_fmnist": ("vgg16", {"width": 0.25, "in_channels": 1, "num_classes": 10}, 0.05),
    "resnet20_fmnist": ("cifar_resnet20", {"in_channels": 1, "num_classes": 10}, 0.1),
    "resnet56_fmnist": ("cifar_resnet56", {"in_channels": 1, "num_classes": 10}, 0.1),
    "mobilenetv2_fmnist": (
        "cifar_mobilenet_v2",
        {"width": 0.5, "in_channels": 1, "num_classes": 10, "stem_stride": 2},
        0.05,
    ),
    "convnext_fmnist": ("cifar_convnext", {"in_channels": 1, "num_classes": 10}, 0.02),
}
BUILDERS = {
    "vgg16": vgg16,
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet56": cifar_resnet56,
    "cifar_mobilenet_v2": cifar_mobilenet_v2,
    "cifar_convnext": cifar_convnext,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--epochs", type=int, default=8, help="passes over the 60k images (8)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, help="peak learning rate (per-model default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bn-l1",
        type=float,
        default=0.0,
        metavar="LAMBDA",
        help="sparsity penalty on the BatchNorm scales, Network Slimming (0: none; the "
        "paper used 1e-4); the model is saved as NAME_bnl1",
    )
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="train without random shifts and flips (the shipped ConvNeXt: with them it "
        "did not learn, loss at ln 10 after 100-400 steps at lr 0.005-0.02; likely the "
        "zero-filled borders: all-zero stem outputs under a LayerNorm of eps 1e-6)",
    )
    parser.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out-dir", default=str(PRETRAINED_MANIFEST.parent))
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="save the training state to PATH every 400 steps; run the same command again "
        "after an interruption to continue from it (recon.finetune's checkpoint=)",
    )
    args = parser.parse_args()

    builder, kwargs, lr = MODELS[args.name]
    lr = args.lr or lr
    x_raw, y_raw = load_fashion_mnist("train", data_dir=args.data_dir)
    xt_raw, yt_raw = load_fashion_mnist("test", data_dir=args.data_dir)
    x, y = to_tensor32(x_raw), torch.as_tensor(y_raw, dtype=torch.long)
    x_test, y_test = to_tensor32(xt_raw), torch.as_tensor(yt_raw, dtype=torch.long)

    torch.manual_seed(args.seed)
    model = BUILDERS[builder](**kwargs)
    steps = args.epochs * (len(x) // args.batch_size)
    t0 = time.perf_counter()
    finetune(
        model, x, y, steps=steps, lr=lr, batch_size=args.batch_size, seed=args.seed,
        bn_l1=args.bn_l1, checkpoint=args.checkpoint, checkpoint_every=400,
        augment=not args.no_augment,
    )  # fmt: skip
    name = f"{args.name}_bnl1" if args.bn_l1 > 0 else args.name
    seconds = time.perf_counter() - t0
    print(f"trained {steps} steps in {seconds:.0f} s", file=sys.stderr)

    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    acc = evaluate(model.eval(), x_test, y_test)
    out_dir = Path(args.out_dir)
    path = out_dir / f"{name}.pt"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    torch.save(state, tmp)
    os.replace(tmp, path)
    manifest_path = out_dir / PRETRAINED_MANIFEST.name
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    command = f"python scripts/train.py {args.name} --epochs {args.epochs} --seed {args.seed}"
    if args.bn_l1 > 0:
        command += f" --bn-l1 {args.bn_l1:g}"
    if args.no_augment:
        command += " --no-augment"
    manifest[name] = {
        "builder": builder,
        "kwargs": kwargs,
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "dataset": "Fashion-MNIST (60,000 train / 10,000 test, 28x28 padded to 32x32)",
        "test_accuracy": round(acc, 4),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": lr,
        "train_seconds": round(seconds),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "command": command,
        **({"bn_l1": args.bn_l1} if args.bn_l1 > 0 else {}),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"{name}: test accuracy {100 * acc:.2f}% -> {path}")


if __name__ == "__main__":
    main()
