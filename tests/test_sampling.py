"""Seeded position sampling and patch/target gathering against ``unfold`` and indexing."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from recon.sampling import (
    _mix,
    gather_patches,
    gather_targets,
    layer_key,
    sample_positions,
)

# --- positions ----------------------------------------------------------------------------


def test_positions_shape_dtype_range_and_distinct():
    pos = sample_positions(5, 49, 10, seed=0, layer=3)
    assert pos.shape == (5, 10) and pos.dtype == torch.int64
    assert int(pos.min()) >= 0 and int(pos.max()) < 49
    for row in pos.tolist():
        assert len(set(row)) == 10  # without replacement within an image
    # different images get different draws
    assert len({tuple(r) for r in pos.tolist()}) == 5


def test_positions_are_deterministic():
    a = sample_positions(4, 100, 7, seed=11, layer=2)
    torch.manual_seed(123)  # the global generator plays no part
    b = sample_positions(4, 100, 7, seed=11, layer=2)
    assert torch.equal(a, b)


def test_positions_depend_on_seed_layer_and_image():
    base = sample_positions(3, 100, 10, seed=1, layer=1)
    assert not torch.equal(base, sample_positions(3, 100, 10, seed=2, layer=1))
    assert not torch.equal(base, sample_positions(3, 100, 10, seed=1, layer=2))
    shifted = sample_positions(3, 100, 10, seed=1, layer=1, image_offset=1)
    assert torch.equal(shifted[:2], base[1:])
    assert not torch.equal(shifted, base)


@pytest.mark.parametrize("sizes", [[8], [1] * 8, [3, 5], [2, 2, 4], [7, 1]])
def test_positions_independent_of_batching(sizes):
    whole = sample_positions(8, 64, 9, seed=5, layer=layer_key("features.3"))
    parts, offset = [], 0
    for size in sizes:
        parts.append(
            sample_positions(
                size, 64, 9, seed=5, layer=layer_key("features.3"), image_offset=offset
            )
        )
        offset += size
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("per_image", [None, 12, 40])
def test_none_or_too_many_gives_every_position(per_image):
    pos = sample_positions(3, 12, per_image, seed=0, layer=0)
    assert pos.shape == (3, 12)
    for row in pos:
        assert torch.equal(row, torch.arange(12))


def test_per_image_equal_to_positions_minus_one_is_a_permutation_subset():
    pos = sample_positions(2, 6, 5, seed=9, layer=0)
    assert pos.shape == (2, 5)
    for row in pos.tolist():
        assert len(set(row)) == 5 and set(row) <= set(range(6))


def test_layer_key_and_mix_are_stable():
    assert layer_key("conv1") == layer_key("conv1")
    assert layer_key("conv1") != layer_key("conv2")
    assert _mix(1, 2, 3) == _mix(1, 2, 3)
    assert _mix(1, 2, 3) != _mix(1, 2, 4)
    assert 0 <= _mix(-5, 2**70, 0) < 2**63  # a valid torch seed for any input


# --- patches --------------------------------------------------------------------------------


def _out_size(size, pad, kernel, stride, dilation):
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def _reference_patches(x, pos, kernel, stride, padding, dilation):
    """``unfold`` columns at ``pos`` (input zero-padded explicitly, so padding may be uneven)."""
    xp = F.pad(x, padding)
    cols = F.unfold(xp, kernel, dilation=dilation, stride=stride)  # (B, c*kh*kw, L)
    return torch.cat([cols[i, :, pos[i]].T for i in range(x.shape[0])])


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [
        ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
        ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
        ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
        ((5, 5), (1, 1), (4, 4, 4, 4), (2, 2)),
        ((3, 1), (2, 1), (1, 1, 0, 0), (1, 1)),
        ((2, 4), (1, 3), (0, 2, 1, 0), (1, 1)),  # asymmetric: left, right, top, bottom
        ((4, 4), (1, 1), (1, 2, 1, 2), (1, 1)),  # what padding="same" gives an even kernel
        ((3, 2), (2, 1), (2, 0, 0, 3), (2, 3)),
    ],
)
@pytest.mark.parametrize("per_image", [5, None])
def test_patches_equal_unfold_columns(kernel, stride, padding, dilation, per_image):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 10, 11, generator=g)
    ho = _out_size(10, padding[2] + padding[3], kernel[0], stride[0], dilation[0])
    wo = _out_size(11, padding[0] + padding[1], kernel[1], stride[1], dilation[1])
    pos = sample_positions(3, ho * wo, per_image, seed=1, layer=0)
    got = gather_patches(
        x,
        pos,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        out_width=wo,
    )
    S = pos.shape[1]
    assert got.shape == (3 * S, 2 * kernel[0] * kernel[1])
    ref = _reference_patches(x, pos, kernel, stride, padding, dilation)
    assert torch.equal(got, ref)  # a pure gather: bit-exact


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize("padding", [1, "same", "valid", (2, 0)])
def test_patches_times_weight_equal_conv_output(padding):
    conv = torch.nn.Conv2d(3, 4, (4, 3), padding=padding, dilation=(1, 2), bias=False)
    conv = conv.double()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = conv(x)
    ho, wo = y.shape[2:]
    pos = sample_positions(2, ho * wo, 6, seed=0, layer=1)
    pad = tuple(conv._reversed_padding_repeated_twice)  # (left, right, top, bottom)
    patches = gather_patches(
        x,
        pos,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=pad,
        dilation=conv.dilation,
        out_width=wo,
    )
    out = patches @ conv.weight.reshape(4, -1).T  # channel-major, like weight.reshape(n, -1)
    torch.testing.assert_close(out, gather_targets(y, pos))


def test_patch_known_answer():
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(1, 2, 4, 5)
    pos = torch.tensor([[0, 5]])  # output (0, 0) and (1, 2) of a 3x3 valid conv (out 2x3)
    got = gather_patches(
        x,
        pos,
        kernel_size=(3, 3),
        stride=(1, 1),
        padding=(0, 0, 0, 0),
        dilation=(1, 1),
        out_width=3,
    )
    ch0 = [0, 1, 2, 5, 6, 7, 10, 11, 12]
    first = ch0 + [v + 20 for v in ch0]
    ch0b = [7, 8, 9, 12, 13, 14, 17, 18, 19]
    second = ch0b + [v + 20 for v in ch0b]
    assert got.tolist() == [first, second]


# --- targets --------------------------------------------------------------------------------


@pytest.mark.parametrize("per_image", [4, None])
def test_targets_equal_indexing(per_image):
    y = torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(2))
    pos = sample_positions(3, 42, per_image, seed=4, layer=0)
    got = gather_targets(y, pos)
    S = pos.shape[1]
    assert got.shape == (3 * S, 5)
    ref = torch.stack([y[i, :, int(p) // 7, int(p) % 7] for i in range(3) for p in pos[i]])
    assert torch.equal(got, ref)


def test_targets_rows_line_up_with_patches():
    # row r of patches and row r of targets come from the same image and position
    x = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    pos = sample_positions(2, 25, 6, seed=0, layer=0)
    patches = gather_patches(
        x,
        pos,
        kernel_size=(1, 1),
        stride=(1, 1),
        padding=(0, 0, 0, 0),
        dilation=(1, 1),
        out_width=5,
    )
    torch.testing.assert_close(patches, gather_targets(x, pos))
