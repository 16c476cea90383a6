"""recon.mobilenet: MobileNetV2 for 32-px images, and pruning it."""

from __future__ import annotations

import pytest
import torch
from nets import quiet_prune, randomize_bn, rel_error
from torch import nn

from recon.graph import find_units
from recon.mobilenet import MOBILENET_V2_CFG, InvertedResidual, MobileNetV2, cifar_mobilenet_v2

X = torch.randn(24, 1, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("stem_stride", "maps"), [(1, 4), (2, 2)])
def test_forward_shape_and_final_maps(stem_stride, maps):
    net = cifar_mobilenet_v2(width=0.5, in_channels=1, stem_stride=stem_stride).eval()
    assert net(X).shape == (24, 10)
    assert net.features(X).shape[2:] == (maps, maps)


def test_blocks_follow_the_configuration():
    net = MobileNetV2(width=1.0)
    blocks = [m for m in net.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == sum(n for _, _, n, _ in MOBILENET_V2_CFG)
    assert [b.use_residual for b in blocks[:4]] == [False, False, True, False]
    assert isinstance(blocks[0].expand, nn.Identity)  # t = 1: no expand conv


def test_matches_torchvision_with_its_strides():
    torchvision = pytest.importorskip("torchvision")
    cfg = tuple((t, c, n, 2 if i == 1 else s) for i, (t, c, n, s) in enumerate(MOBILENET_V2_CFG))
    ours = MobileNetV2(cfg, width=0.5, num_classes=10, stem_stride=2)
    theirs = torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values(), strict=True)))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, r"'width' parameter of MobileNetV2 must be a float in \(0, inf\)\. Got 0"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"stem_stride": True}, "stem_stride"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MobileNetV2(**kwargs)


def test_every_expand_is_a_unit_and_the_refit_helps():
    torch.manual_seed(0)
    net = randomize_bn(cifar_mobilenet_v2(width=0.5, in_channels=1, stem_stride=2)).eval()
    graph = find_units(net)
    assert sum(1 for u in graph.units if u.kind == "sampler") == 10
    assert all(u.channelwise for u in graph.units if u.kind == "plain")  # dw convs cut along
    x = X[:16]
    torch.testing.assert_close(quiet_prune(net, x, keep_ratio=1.0).model(X), net(X))
    kw = {"speedup": 1.5, "method": "thinet", "allocation": "uniform"}
    fitted, none = quiet_prune(net, x, **kw), quiet_prune(net, x, reconstruct="none", **kw)
    assert fitted.report.speedup == pytest.approx(1.5, rel=0.02)
    assert rel_error(fitted.model(X), net(X)) < rel_error(none.model(X), net(X))
