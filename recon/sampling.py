"""Seeded sampling of output positions and gathering of input patches at them.

Positions are drawn per image from a seed derived from ``(seed, layer, image index)``,
so the same image gets the same positions whatever the batch size, the batch order
or the number of processes. Patches are gathered only at the sampled positions:
no full ``unfold`` of the feature map.

This module sees tensors only.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_patches", "gather_targets", "layer_key", "sample_positions", "tokens_as_map"]

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A splitmix64-style hash of integers, stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & 0x7FFF_FFFF_FFFF_FFFF


def layer_key(name: str) -> int:
    """A stable integer for a layer name (used in the position seed)."""
    return zlib.crc32(name.encode())


def sample_positions(
    num_images: int,
    num_positions: int,
    per_image: int | None,
    *,
    seed: int,
    layer: int,
    image_offset: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Flat output positions to sample, per image.

    Parameters
    ----------
    num_images : int
        Images in the batch.
    num_positions : int
        Positions in one output map (``H_out * W_out``).
    per_image : int or None
        Positions drawn per image, without replacement; ``None`` (or a number not
        smaller than ``num_positions``) takes every position.
    seed, layer : int
        Together with the global image index, they seed each image's draw.
    image_offset : int
        Global index of the first image of the batch.

    Returns
    -------
    Tensor, shape (num_images, S), int64
        ``S = min(per_image, num_positions)``.
    """
    if per_image is None or per_image >= num_positions:
        return torch.arange(num_positions, device=device).expand(num_images, -1)
    rows = []
    gen = torch.Generator()
    for i in range(num_images):
        gen.manual_seed(_mix(seed, layer, image_offset + i))
        rows.append(torch.randperm(num_positions, generator=gen)[:per_image])
    return torch.stack(rows).to(device)


def gather_patches(
    x: Tensor,
    positions: Tensor,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    out_width: int,
) -> Tensor:
    """Input patches of a convolution at the given output positions.

    Parameters
    ----------
    x : Tensor, shape (B, c, H, W)
        The convolution's input.
    positions : Tensor, shape (B, S)
        Flat indices into the ``(H_out, W_out)`` output grid.
    padding : (left, right, top, bottom)
        Zero padding, in :func:`torch.nn.functional.pad` order.

    Returns
    -------
    Tensor, shape (B*S, c*kh*kw)
        Channel-major patches, matching ``weight.reshape(n, -1)`` of the conv.
    """
    b, c = x.shape[:2]
    kh, kw = kernel_size
    if any(padding):
        x = F.pad(x, padding)
    x = x.permute(0, 2, 3, 1)  # (B, Hp, Wp, c)
    oh = positions // out_width  # (B, S)
    ow = positions % out_width
    taps_h = torch.arange(kh, device=x.device) * dilation[0]
    taps_w = torch.arange(kw, device=x.device) * dilation[1]
    rows = (oh * stride[0])[..., None] + taps_h  # (B, S, kh)
    cols = (ow * stride[1])[..., None] + taps_w  # (B, S, kw)
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    patches = x[bidx, rows[..., :, None], cols[..., None, :]]  # (B, S, kh, kw, c)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, c * kh * kw)


def gather_targets(y: Tensor, positions: Tensor) -> Tensor:
    """Outputs at the sampled positions: ``y`` (B, n, H, W) -> (B*S, n)."""
    b, n = y.shape[:2]
    flat = y.reshape(b, n, -1)
    idx = positions[:, None, :].expand(b, n, positions.shape[1])
    return flat.gather(2, idx).permute(0, 2, 1).reshape(-1, n)


def tokens_as_map(x: Tensor) -> Tensor:
    """A linear layer's input or output over its last dimension as a one-column map.

    ``x`` (B, ..., c) -> (B, c, P, 1), ``P`` the token positions of an image (every
    dimension between the first and the last: ViT's tokens, ConvNeXt's ``H × W``
    channels-last pixels; 1 for a (B, c) input). A linear layer applied to every token
    is then a 1×1 convolution of this map, and its positions are sampled as a conv's.
    """
    b, c = x.shape[0], x.shape[-1]
    return x.reshape(b, -1, c).transpose(1, 2).unsqueeze(-1)
