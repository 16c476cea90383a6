"""Tests of recon.models: shapes, traceability, width scaling, argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from recon import models
from recon.models import VGG, VGG_CFGS, digits_vgg

BUILDERS = [models.vgg11, models.vgg13, models.vgg16, models.vgg19]


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "nobn"])
def test_builders_forward_and_trace(builder, batch_norm):
    torch.manual_seed(0)
    model = builder(batch_norm=batch_norm, width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()

    cfg = VGG_CFGS[builder.__name__]
    convs = _convs(model)
    assert [c.out_channels for c in convs] == [max(1, round(v * 0.25)) for v in cfg if v != "M"]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert all((c.bias is None) == batch_norm for c in convs)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == (len(convs) if batch_norm else 0)
    n_pool = sum(isinstance(m, nn.MaxPool2d) for m in model.features)
    assert n_pool == cfg.count("M") == 5
    # 32 / 2**5 = 1: the classifier reads the last conv's channels directly.
    assert model.classifier.in_features == convs[-1].out_channels

    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)


def test_vgg_cfg_matches_torchvision_lists():
    assert sum(v != "M" for v in VGG_CFGS["vgg11"]) == 8
    assert sum(v != "M" for v in VGG_CFGS["vgg13"]) == 10
    assert sum(v != "M" for v in VGG_CFGS["vgg16"]) == 13
    assert sum(v != "M" for v in VGG_CFGS["vgg19"]) == 16
    tv = pytest.importorskip("torchvision.models.vgg")
    for name, letter in [("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E")]:
        assert VGG_CFGS[name] == tv.cfgs[letter]


def test_builder_options():
    model = models.vgg11(width=0.125, num_classes=7, in_channels=1, input_size=64)
    assert model(torch.randn(3, 1, 64, 64)).shape == (3, 7)
    assert _convs(model)[0].in_channels == 1
    # 64 / 2**5 = 2 -> 2x2 spatial at the classifier.
    assert model.classifier.in_features == 64 * 2 * 2
    assert model.cfg[0] == 8


def test_width_rounding_never_zero():
    model = VGG([3, "M", 5], width=0.01, input_size=4)
    assert [c.out_channels for c in _convs(model)] == [1, 1]
    assert model.cfg == [1, "M", 1]


def test_digits_vgg_shape_and_trace():
    model = digits_vgg().eval()
    x = torch.randn(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    assert model.classifier.in_features == 64
    assert model.classifier.out_features == 10
    assert [c.out_channels for c in _convs(model)] == [16, 16, 32, 32, 64]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 5
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))

    half = digits_vgg(width=0.5)
    assert [c.out_channels for c in _convs(half)] == [8, 8, 16, 16, 32]
    assert half.classifier.in_features == 32


def test_init_like_torchvision():
    torch.manual_seed(0)
    model = models.vgg11(width=0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.classifier.bias == 0)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.2)
    conv = _convs(model)[-1]  # fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.1)


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = digits_vgg()
    torch.manual_seed(3)
    b = digits_vgg()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cfg": []}, "'cfg'"),
        ({"cfg": ["M"]}, "'cfg'"),
        ({"cfg": [8, "X"]}, "'cfg'.*index 1"),
        ({"cfg": [8, 0]}, "'cfg'"),
        ({"cfg": [8], "width": 0}, "'width'"),
        ({"cfg": [8], "num_classes": 0}, "'num_classes'"),
        ({"cfg": [8, "M", 8, "M"], "input_size": 6}, "'input_size'.*divisible by 2\\*\\*2"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VGG(**kwargs)
