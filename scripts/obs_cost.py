"""What choosing channels costs per layer: ``method="obs"`` against LASSO and ThiNet.

For consumers of ``c`` input channels and ``k×k`` kernels (``d = c·k²`` patch inputs,
``c`` outputs), random statistics from ``2d`` samples: the time of each method's whole
nested order (what ``allocation="auto"``'s profile computes) and of one selection of
half the channels (what pruning a unit computes). ``obs`` works on the ``d × d`` patch
Gram, LASSO and ThiNet on the ``c × c`` channel problem built from it.

    python scripts/obs_cost.py                  # c = 64 .. 512, 3×3 kernels
    python scripts/obs_cost.py --widths 64,128 --kernel 1
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _args

from recon.select import channel_order, select_channels
from recon.stats import PatchStats


def _stats(c: int, taps: int, seed: int) -> tuple[PatchStats, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = c * taps
    x = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, c, taps, generator=g, dtype=torch.float64) / d**0.5
    y = x @ w.reshape(c, d).T + 0.1 * torch.randn(2 * d, c, generator=g, dtype=torch.float64)
    st = PatchStats(channels=c, taps=taps, outputs=c)
    st.update(x, y)
    return st, w


def _seconds(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--widths",
        type=_args.ints("widths"),
        default=(64, 128, 256, 512),
        help="input channels c, comma-separated (64,128,256,512)",
    )
    p.add_argument("--kernel", type=_args.int_at_least(1), default=3, help="kernel size k (3)")
    args = p.parse_args(argv)
    taps = args.kernel**2
    print(
        f"# Channel selection cost per layer ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})\n\n"
        f"`{' '.join(['python scripts/obs_cost.py', *(sys.argv[1:] if argv is None else argv)])}`"
        f": {args.kernel}×{args.kernel} kernels, seconds.\n\n"
        "| c | d = c·k² | obs order | obs, keep c/2 | lasso order | lasso, keep c/2 "
        "| thinet order |\n|---|---|---|---|---|---|---|"
    )
    for c in args.widths:
        st, w = _stats(c, taps, seed=c)
        A, b = st.channel_problem(w)
        t = [
            _seconds(channel_order, "obs", stats=st),
            _seconds(select_channels, "obs", c // 2, stats=st),
            _seconds(channel_order, "lasso", A=A, b=b),
            _seconds(select_channels, "lasso", c // 2, A=A, b=b),
            _seconds(channel_order, "thinet", A=A, b=b),
        ]
        print(f"| {c} | {c * taps} | " + " | ".join(f"{v:.2f}" for v in t) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
