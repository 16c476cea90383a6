"""Tests of ``recon.surgery``: physical slicing of convs, BatchNorms and linears."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recon import models
from recon.graph import find_units
from recon.surgery import apply_bias_delta, prune_unit, slice_bn, slice_outputs


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model


def _net(mid: int, *, head: str = "conv") -> nn.Sequential:
    """conv(3->mid) -> BN -> ReLU -> pool -> [conv(mid->5) -> BN | flatten -> linear]."""
    layers = [
        nn.Conv2d(3, mid, 3, padding=1),  # 0
        nn.BatchNorm2d(mid),  # 1
        nn.ReLU(),  # 2
        nn.MaxPool2d(2),  # 3
    ]
    if head == "conv":
        layers += [nn.Conv2d(mid, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)]  # 4, 5
    else:
        layers += [nn.Flatten(), nn.Linear(mid * 4 * 4, 5)]  # 4, 5
    return nn.Sequential(*layers)


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _copy_subset(big: nn.Sequential, small: nn.Sequential, keep: list[int], head: str) -> None:
    """Fill ``small`` with ``big``'s weights for channels ``keep`` (independent of surgery)."""
    k = torch.tensor(keep)
    with torch.no_grad():
        small[0].weight.copy_(big[0].weight[k])
        small[0].bias.copy_(big[0].bias[k])
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(small[1], attr).copy_(getattr(big[1], attr)[k])
        if head == "conv":
            small[4].weight.copy_(big[4].weight[:, k])
            small[5].load_state_dict(big[5].state_dict())
        else:
            w = big[5].weight.reshape(5, -1, 16)[:, k].reshape(5, -1)
            small[5].weight.copy_(w)
            small[5].bias.copy_(big[5].bias)


@pytest.mark.parametrize("head", ["conv", "linear"])
def test_prune_all_channels_is_identity(head):
    torch.manual_seed(0)
    model = _randomize_bn(_net(8, head=head)).eval()
    ref = model(X)
    unit = find_units(model).unit("0")
    prune_unit(model, unit, torch.arange(8))
    torch.testing.assert_close(model(X), ref)


def test_prune_all_channels_permuted_is_identity():
    torch.manual_seed(0)
    model = _randomize_bn(models.vgg11(width=0.125)).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    graph = find_units(model)
    for unit in graph.units:
        keep = torch.randperm(unit.width)  # unsorted: every slice must use the same order
        prune_unit(model, unit, keep)
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head", ["conv", "linear"])
def test_prune_subset_matches_smaller_model(head):
    torch.manual_seed(0)
    keep = [1, 3, 4, 6]
    big = _randomize_bn(_net(8, head=head)).eval()
    small = _net(4, head=head).eval()
    _copy_subset(big, small, keep, head)
    unit = find_units(big).unit("0")
    assert unit.taps == (9 if head == "conv" else 16)
    pruned = copy.deepcopy(big)
    prune_unit(pruned, unit, torch.tensor(keep))

    out = pruned(X)
    assert out.shape == small(X).shape
    torch.testing.assert_close(out, small(X))
    # The sliced model has the smaller model's shapes and attributes.
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {
        k: v.shape for k, v in small.state_dict().items()
    }
    assert pruned[0].out_channels == 4
    assert pruned[1].num_features == 4
    if head == "conv":
        assert pruned[4].in_channels == 4
    else:
        assert pruned[5].in_features == 4 * 16
        # Feature i*16 + p of the pruned linear is feature keep[i]*16 + p of the original.
        for i, c in enumerate(keep):
            assert torch.equal(
                pruned[5].weight[:, i * 16 : (i + 1) * 16], big[5].weight[:, c * 16 : (c + 1) * 16]
            )
    # Removing channels changed the output of the original: the test is not vacuous.
    assert not torch.allclose(out, big(X), atol=1e-3)


def test_bn_buffers_and_parameters_sliced():
    torch.manual_seed(0)
    model = _randomize_bn(_net(8)).eval()
    bn_before = copy.deepcopy(model[1])
    keep = torch.tensor([0, 2, 7])
    prune_unit(model, find_units(model).unit("0"), keep)
    bn = model[1]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, attr), getattr(bn_before, attr)[keep])
    assert isinstance(bn.weight, nn.Parameter) and bn.weight.requires_grad
    assert "running_mean" in dict(bn.named_buffers())
    assert int(bn.num_batches_tracked) == 7
    assert bn.num_features == 3
    # The BN after the consumer reads the consumer's outputs: untouched.
    assert model[5].num_features == 5


def test_slice_bn_without_affine_or_stats():
    bn = nn.BatchNorm2d(6, affine=False, track_running_stats=False)
    slice_bn(bn, torch.tensor([1, 2]))
    assert bn.num_features == 2
    assert bn(torch.randn(3, 2, 4, 4)).shape == (3, 2, 4, 4)


def test_sliced_model_is_trainable():
    torch.manual_seed(0)
    model = _net(8, head="linear")
    prune_unit(model, find_units(model).unit("0"), [0, 5])
    model.train()
    loss = model(X).square().mean()
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape


def test_slice_outputs_linear():
    lin = nn.Linear(4, 6)
    w = lin.weight.detach().clone()
    slice_outputs(lin, torch.tensor([5, 0]))
    assert lin.out_features == 2
    assert torch.equal(lin.weight, w[[5, 0]])


@pytest.mark.parametrize("shape", ["flat", "3d"])
def test_prune_unit_installs_given_weight(shape):
    torch.manual_seed(0)
    model = _net(8).eval()
    unit = find_units(model).unit("0")
    w = torch.randn(5, 3, 9, dtype=torch.float64)
    prune_unit(model, unit, [1, 2, 3], weight=w.reshape(5, 27) if shape == "flat" else w)
    assert model[4].weight.dtype == torch.float32
    assert torch.equal(model[4].weight, w.float().reshape(5, 3, 3, 3))


def test_prune_unit_linear_weight_layout():
    torch.manual_seed(0)
    model = _net(8, head="linear").eval()
    unit = find_units(model).unit("0")
    w = torch.randn(5, 2 * 16)
    prune_unit(model, unit, [3, 6], weight=w)
    assert torch.equal(model[5].weight, w)
    assert model[5].in_features == 32


# --------------------------------------------------------------------------- bias delta


def test_bias_delta_into_existing_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    unit = find_units(model).unit("0")
    assert unit.consumer_bn is None and model[2].bias is not None
    before = model(X)
    delta = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    apply_bias_delta(model, unit, delta)
    shift = model(X) - before
    assert torch.allclose(shift, delta.float().view(1, 4, 1, 1).expand_as(shift), atol=1e-5)
    assert model[2].bias.dtype == torch.float32 and isinstance(model[2].bias, nn.Parameter)


def test_bias_delta_into_following_bn_running_mean():
    torch.manual_seed(0)
    model = _randomize_bn(_net(8)).eval()
    unit = find_units(model).unit("0")
    assert unit.consumer_bn == "5" and model[4].bias is None
    delta = torch.randn(5, dtype=torch.float64)
    # Reference: the same model with the consumer's output shifted by delta (a bias).
    ref = copy.deepcopy(model)
    ref[4].bias = nn.Parameter(delta.float())
    mean_before = model[5].running_mean.clone()

    apply_bias_delta(model, unit, delta)
    assert model[4].bias is None  # architecture unchanged: no bias created
    assert torch.allclose(model[5].running_mean, mean_before - delta.float(), atol=1e-6)
    # Shifting the consumer by delta == the model's output after the BN.
    assert torch.allclose(model(X), ref(X), atol=1e-5)
    # At the consumer's output (before BN) the shift would be exactly delta.
    shift = ref[:5](X) - model[:5](X)
    assert torch.allclose(shift, delta.float().view(1, 5, 1, 1).expand_as(shift), atol=1e-5)


def test_bias_delta_creates_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, bias=False)).eval()
    unit = find_units(model).unit("0")
    before = model(X)
    delta = torch.tensor([0.25, -1.0, 2.0, 0.0], dtype=torch.float64)
    apply_bias_delta(model, unit, delta)
    bias = model[2].bias
    assert isinstance(bias, nn.Parameter) and "bias" in dict(model[2].named_parameters())
    assert bias.dtype == torch.float32 and torch.equal(bias, delta.float())
    shift = model(X) - before
    assert torch.allclose(shift, delta.float().view(1, 4, 1, 1).expand_as(shift), atol=1e-5)


def test_bias_delta_linear_consumer():
    torch.manual_seed(0)
    model = _net(8, head="linear").eval()
    unit = find_units(model).unit("0")
    before = model(X)
    delta = torch.randn(5, dtype=torch.float64)
    apply_bias_delta(model, unit, delta)
    assert torch.allclose(model(X) - before, delta.float().expand(4, 5), atol=1e-5)


def test_prune_unit_with_bias_delta():
    torch.manual_seed(0)
    model = _randomize_bn(_net(8)).eval()
    unit = find_units(model).unit("0")
    delta = torch.randn(5, dtype=torch.float64)
    mean_before = model[5].running_mean.clone()
    prune_unit(model, unit, [0, 1], bias_delta=delta)
    assert torch.allclose(model[5].running_mean, mean_before - delta.float(), atol=1e-6)
    assert model(X).shape == (4, 5, 4, 4)
