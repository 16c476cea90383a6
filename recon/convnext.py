"""A small ConvNeXt for small images (Liu et al., 2022), architecture as data.

torchvision's ``convnext_tiny`` block, sized for 32-px images: a patchify stem
(``stem``×``stem`` conv of stride ``stem``, then LayerNorm), stages of ConvNeXt blocks
with a 2×2 stride-2 downsampling conv between them, global average pooling, LayerNorm
and a linear classifier. Each block is torchvision's ``CNBlock``::

    x -> depthwise k×k conv -> permute to (B, H, W, C) -> LayerNorm -> Linear(C, 4C)
      -> GELU -> Linear(4C, C) -> permute back -> × layer_scale -> + x

Its MLP (``block.3`` -> ``block.4`` -> ``block.5``) is the part recon prunes: the 4C
hidden features are the channels, read by ``block.5`` at every pixel (a unit of kind
``"tokens"``, :mod:`recon.graph`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import _check_positive_int

__all__ = ["CONVNEXT_CFG", "CNBlock", "ConvNeXt", "LayerNorm2d", "cifar_convnext"]

#: Stages as (channels, blocks): a 32-px image is 16×16, 8×8 and 4×4 in them.
CONVNEXT_CFG = ((32, 2), (64, 2), (128, 2))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (torchvision's)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (torchvision's ``ops.misc.Permute``)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """``x + layer_scale · mlp(norm(dwconv(x)))``, the MLP channels-last.

    Parameters
    ----------
    dim : int
        Channels in and out.
    kernel : int
        Of the depthwise conv (7 in torchvision; smaller maps want smaller).
    layer_scale : float
        Initial value of the per-channel output scale.
    """

    def __init__(self, dim: int, kernel: int = 7, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim),  # (B, C, H, W)
            Permute((0, 2, 3, 1)),  # (B, H, W, C)
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),  # (B, H, W, 4C): the unit's channels
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute((0, 3, 1, 2)),  # (B, C, H, W)
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    """Stem, stages of :class:`CNBlock`, and a pooled LayerNorm + linear head.

    Parameters
    ----------
    cfg : sequence of (channels, blocks)
        The stages (:data:`CONVNEXT_CFG`).
    in_channels, num_classes : int
    stem : int
        Patch size and stride of the stem conv.
    kernel : int
        Of the blocks' depthwise convs.
    """

    def __init__(
        self,
        cfg: tuple[tuple[int, int], ...] = CONVNEXT_CFG,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        stem: int = 2,
        kernel: int = 5,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("stem", stem)
        _check_positive_int("kernel", kernel)
        if not cfg or any(len(s) != 2 for s in cfg):
            raise ValueError(
                f"ConvNeXt: the 'cfg' argument must be a non-empty sequence of (channels, "
                f"blocks) pairs. Got {cfg!r} instead."
            )
        first = cfg[0][0]
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, first, stem, stem), LayerNorm2d(first, eps=1e-6))
        ]
        prev = first
        for i, (dim, blocks) in enumerate(cfg):
            _check_positive_int(f"cfg[{i}] channels", dim)
            _check_positive_int(f"cfg[{i}] blocks", blocks)
            if dim != prev:  # downsample: LayerNorm, 2×2 conv of stride 2
                layers.append(
                    nn.Sequential(LayerNorm2d(prev, eps=1e-6), nn.Conv2d(prev, dim, 2, 2))
                )
            layers.append(nn.Sequential(*(CNBlock(dim, kernel) for _ in range(blocks))))
            prev = dim
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(prev, eps=1e-6), nn.Flatten(1), nn.Linear(prev, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))  # (B, num_classes)


def cifar_convnext(
    *, in_channels: int = 3, num_classes: int = 10, cfg: tuple[tuple[int, int], ...] = CONVNEXT_CFG
) -> ConvNeXt:
    """A ConvNeXt for 32-px images: stages of 32, 64 and 128 channels, two blocks each.

    Examples
    --------
    >>> net = cifar_convnext(in_channels=1)
    >>> net(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 10])
    """
    return ConvNeXt(cfg, in_channels=in_channels, num_classes=num_classes)
