"""A sampled 1x1 convolution with and without its gather, contiguous and channels_last.

A :class:`recon.layers.SampledConv2d` selects its input channels before convolving.
On a channels_last tensor that selection gathers along the innermost dimension and
copies the whole input; since 2026-12-02 a 1x1 layer on channels_last CPU input
instead convolves every source channel with a weight that is zero outside its index.
This script times both ways in one process, at the shapes of torchvision ResNet-50's
sampled convolutions (each bottleneck's ``conv1``, 70 % of the source channels kept):

    python scripts/sampler_layout.py             # 224 px shapes, batch 1 and 8
    python scripts/sampler_layout.py --quick     # tiny shapes: seconds
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from recon.bench import forward_seconds
from recon.layers import SampledConv2d

#: (source channels, spatial size, output channels) of ResNet-50's stage-wise conv1.
SHAPES = ((256, 56, 64), (512, 28, 128), (1024, 14, 256), (2048, 7, 512))
QUICK = ((32, 8, 8), (64, 4, 16))


class _Gather(nn.Module):
    """``layer`` with its channel gather whatever the input's layout (the older path)."""

    def __init__(self, layer: SampledConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return layer._conv_forward(layer.sampler(x), layer.weight, layer.bias)


def _ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of ``model(x)`` (``recon.bench.forward_seconds``)."""
    return 1000 * forward_seconds(model, [x], repeats=repeats)


def measure(shapes, batches, repeats: int, keep: float = 0.7) -> list[dict]:
    """One row per shape, batch and memory format: ms with the gather and with the
    default path (the zero-padded weight on channels_last, the gather otherwise)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for c, size, n in shapes:
            index = torch.randperm(c, generator=g)[: int(keep * c)].sort().values
            layer = SampledConv2d.from_conv(nn.Conv2d(c, n, 1, bias=False), index).eval()
            gather = _Gather(layer)
            for batch in batches:
                x = torch.randn(batch, c, size, size, generator=g)
                for fmt in (torch.contiguous_format, torch.channels_last):
                    xf = x.contiguous(memory_format=fmt)
                    m = layer.to(memory_format=fmt)
                    torch.testing.assert_close(m(xf), gather(xf), rtol=1e-4, atol=1e-4)
                    cl = fmt is torch.channels_last
                    rows.append(
                        {
                            "path": "zero-padded weight" if m.skips_gather(xf) else "gather",
                            "shape": (batch, c, size, size),
                            "out": n,
                            "format": "channels_last" if cl else "contiguous",
                            "gather_ms": _ms(gather, xf, repeats),
                            "default_ms": _ms(m, xf, repeats),
                        }
                    )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8", help="batch sizes (1,8)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per cell (30)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats")
    args = p.parse_args(argv)
    shapes, repeats = (QUICK, 3) if args.quick else (SHAPES, args.repeats)
    rows = measure(shapes, tuple(int(b) for b in args.batches.split(",")), repeats)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); 1x1 SampledConv2d "
        "keeping 70 % of its input channels; median ms per call. Where the default path "
        "is the gather too, the gain shows the timing noise."
    )
    print(
        "| input (N, C, H, W) | out | memory format | default path | gather (ms) | "
        "default (ms) | gain |"
    )
    print("|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['out']} | {r['format']} | {r['path']} | "
            f"{r['gather_ms']:.2f} | {r['default_ms']:.2f} | "
            f"{r['gather_ms'] / r['default_ms']:.2f}x |"
        )
    return rows


if __name__ == "__main__":
    main()
