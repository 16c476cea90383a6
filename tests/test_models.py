"""Tests of recon.models (VGG and CIFAR ResNets): shapes, tracing, widths, argument checks."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from recon import models
from recon.models import (
    VGG,
    VGG_CFGS,
    BasicBlock,
    CifarResNet,
    cifar_resnet,
    digits_resnet20,
    digits_vgg,
)

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


# --------------------------------------------------------------------------------------
# CIFAR ResNets
# --------------------------------------------------------------------------------------

RESNET_BUILDERS = {
    20: models.cifar_resnet20,
    32: models.cifar_resnet32,
    44: models.cifar_resnet44,
    56: models.cifar_resnet56,
    110: models.cifar_resnet110,
}


def _blocks(model: nn.Module) -> list[BasicBlock]:
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


def _resnet_param_count(n: int, widths=(16, 32, 64), in_channels=3, num_classes=10) -> int:
    """Parameters of a CIFAR ResNet with option-B shortcuts, counted layer by layer.

    A 3x3 conv (no bias) has ``9 * c_in * c_out`` weights, a 1x1 projection
    ``c_in * c_out``, a BatchNorm ``2 * c`` (running statistics are buffers).
    """
    total = 9 * in_channels * widths[0] + 2 * widths[0]  # stem
    channels = widths[0]
    for w in widths:
        for _ in range(n):
            total += 9 * channels * w + 2 * w + 9 * w * w + 2 * w
            if channels != w:  # every stage after the first starts with a projection
                total += channels * w + 2 * w
            channels = w
    return total + channels * num_classes + num_classes  # fc


@pytest.mark.parametrize(("depth", "size"), [(20, 16), (56, 8), (110, 8)])
def test_resnet_forward_and_trace(depth, size):
    torch.manual_seed(0)
    model = RESNET_BUILDERS[depth]().eval()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out, rtol=0, atol=0)
    # One residual add per block, each a plain (not in-place) add node.
    adds = [n for n in traced.graph.nodes if n.target in (operator.add, operator.iadd)]
    assert len(adds) == len(_blocks(model)) == 3 * (depth - 2) // 6
    assert all(n.target is operator.add for n in adds)


@pytest.mark.parametrize("depth", sorted(RESNET_BUILDERS))
def test_resnet_blocks_per_stage(depth):
    n = (depth - 2) // 6
    for model in (RESNET_BUILDERS[depth](), cifar_resnet(depth)):
        assert model.blocks == (n, n, n)
        assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
        assert model.widths == (16, 32, 64)
        # Depth counts the 3x3 convs and the classifier, not the 1x1 projections.
        n_conv3 = sum(c.kernel_size == (3, 3) for c in _convs(model))
        assert n_conv3 + 1 == depth


def test_resnet20_parameter_count():
    model = models.cifar_resnet20()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == _resnet_param_count(3)
    assert 0.26e6 < n_params < 0.28e6  # "0.27M" in He et al. (2016), Table 6
    wide = models.cifar_resnet20(width=0.5, num_classes=7, in_channels=1)
    expected = _resnet_param_count(3, widths=(8, 16, 32), in_channels=1, num_classes=7)
    assert sum(p.numel() for p in wide.parameters()) == expected


@pytest.mark.parametrize("depth", [20, 110])
def test_resnet_projection_exactly_where_shape_changes(depth):
    model = RESNET_BUILDERS[depth]()
    blocks = _blocks(model)
    projected = [b for b in blocks if b.downsample is not None]
    # Only the first block of layer2 and of layer3 changes stride and channels.
    assert projected == [model.layer2[0], model.layer3[0]]
    for b in blocks:
        changes = b.conv1.stride != (1, 1) or b.conv1.in_channels != b.conv2.out_channels
        assert (b.downsample is not None) == changes
        if b.downsample is None:
            continue
        conv, norm = b.downsample
        assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
        assert conv.kernel_size == (1, 1) and conv.bias is None
        assert conv.stride == b.conv1.stride == (2, 2)
        assert (conv.in_channels, conv.out_channels) == (b.conv1.in_channels, b.conv2.out_channels)
        assert norm.num_features == conv.out_channels


def test_basic_block_known_output():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    identity = BasicBlock(8, 8).eval()
    expected = F.relu(identity.bn2(identity.conv2(F.relu(identity.bn1(identity.conv1(x))))) + x)
    torch.testing.assert_close(identity(x), expected)

    # A channel change alone (stride 1) also needs a projection.
    wider = BasicBlock(8, 12).eval()
    assert wider.downsample is not None and wider.downsample[0].stride == (1, 1)
    branch = wider.bn2(wider.conv2(F.relu(wider.bn1(wider.conv1(x)))))
    torch.testing.assert_close(wider(x), F.relu(branch + wider.downsample(x)))
    assert BasicBlock(8, 12, stride=2)(x).shape == (2, 12, 3, 3)


def test_basic_block_matches_torchvision():
    tv = pytest.importorskip("torchvision.models.resnet")
    torch.manual_seed(0)
    ours = BasicBlock(8, 16, stride=2).eval()
    theirs = tv.BasicBlock(
        8, 16, 2, downsample=nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    ).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x))
    assert [n for n, _ in BasicBlock(8, 8).named_children()] == [
        n for n, _ in tv.BasicBlock(8, 8).named_children()
    ]


def test_resnet_custom_architecture():
    model = CifarResNet([2, 1], widths=[4, 6], in_channels=2, num_classes=3).eval()
    assert model(torch.randn(2, 2, 8, 8)).shape == (2, 3)
    assert not hasattr(model, "layer3")
    assert [len(model.layer1), len(model.layer2)] == [2, 1]
    assert [c.out_channels for c in _convs(model)] == [4, 4, 4, 4, 4, 6, 6, 6]
    assert model.fc.in_features == 6
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


def test_resnet_width_and_options():
    model = models.cifar_resnet56(width=0.25, num_classes=100, in_channels=1)
    assert model.widths == (4, 8, 16)
    assert model.conv1.in_channels == 1
    assert model.fc.in_features == 16 and model.fc.out_features == 100
    tiny = CifarResNet([1, 1, 1], width=0.01)
    assert tiny.widths == (1, 1, 1)


def test_digits_resnet20_shape_and_trace():
    model = digits_resnet20().eval()
    x = torch.randn(5, 1, 8, 8)
    out = model(x)
    assert out.shape == (5, 10)
    assert model.conv1.in_channels == 1
    assert model.blocks == (3, 3, 3)
    assert model.fc.in_features == 64 and model.fc.out_features == 10
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), out)
    assert digits_resnet20(width=0.5).fc.in_features == 32


def test_resnet_init_like_torchvision():
    torch.manual_seed(0)
    model = models.cifar_resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    conv = model.layer3[1].conv2  # fan_out = 64 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)
    assert all(c.bias is None for c in _convs(model))


def test_resnet_builders_keyword_only():
    with pytest.raises(TypeError):
        models.cifar_resnet20(10)  # type: ignore[misc]
    with pytest.raises(TypeError):
        cifar_resnet(20, 10)  # type: ignore[misc]
    with pytest.raises(TypeError):
        BasicBlock(8, 16, 2)  # type: ignore[misc]


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, 111, -4, 20.0, True, "20", None])
def test_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match=r"'depth'.*6n \+ 2.*Got"):
        cifar_resnet(depth)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": []}, "'blocks'.*non-empty"),
        ({"blocks": "333"}, "'blocks'"),
        ({"blocks": (3, 0, 3)}, "'blocks'"),
        ({"blocks": (3, 3.0, 3)}, "'blocks'"),
        ({"blocks": (3, 3)}, "'widths'.*2 ints.*one per stage.*Got \\(16, 32, 64\\)"),
        ({"blocks": (1, 1, 1), "widths": (16, 0, 64)}, "'widths'"),
        ({"blocks": (1, 1, 1), "width": 0}, "'width'.*CifarResNet"),
        ({"blocks": (1, 1, 1), "width": True}, "'width'"),
        ({"blocks": (1, 1, 1), "num_classes": 0}, "'num_classes'"),
        ({"blocks": (1, 1, 1), "in_channels": 0}, "'in_channels'"),
    ],
)
def test_resnet_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CifarResNet(**kwargs)
