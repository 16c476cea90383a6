"""Tests for recon.plans: published channel configurations and the sizes they give.

Sizes are predicted with :func:`recon.budget.predict_flops` from one FLOP count of the
unpruned torchvision model at 224x224, counted on the ``meta`` device (FLOPs depend on
shapes only, so no weights are allocated); one test prunes a real model to check that
the prediction is what pruning gives.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import recon
from recon import plans
from recon.budget import BudgetUnit, count_flops, predict_flops
from recon.graph import find_units

torchvision = pytest.importorskip("torchvision")

ALL = [
    "he2017_vgg16_5x",
    "thinet_vgg16_conv",
    "thinet_vgg16_tiny",
    "thinet_resnet50_30",
    "thinet_resnet50_50",
    "thinet_resnet50_70",
]
MODEL_OF = {"torchvision vgg16": "vgg16", "torchvision resnet50": "resnet50"}
G = 1e9


@dataclass
class Counted:
    """A model's units and the FLOPs of its unpruned forward pass on one image."""

    model: nn.Module
    units: list[BudgetUnit]
    total: int
    per_module: dict[str, int]

    @property
    def conv_flops(self) -> dict[str, int]:
        return {
            name: flops
            for name, flops in self.per_module.items()
            if isinstance(self.model.get_submodule(name), nn.Conv2d)
        }

    def predict(self, channels: dict[str, int], *, conv_only: bool = False) -> float:
        """Predicted FLOPs (2 per multiply-accumulate) after pruning to ``channels``."""
        if conv_only:
            conv = self.conv_flops
            return predict_flops(self.units, channels, conv, sum(conv.values()))
        return predict_flops(self.units, channels, self.per_module, self.total)


def _count(model: nn.Module, x: torch.Tensor) -> Counted:
    """Units as recon.prune sees them (see recon.api) and the FLOPs of one image."""
    units = [
        BudgetUnit(u.name, u.width, (u.producer,) if u.producer else (), (u.consumer,))
        for u in find_units(model).units
    ]
    total, per_module = count_flops(model, x)
    return Counted(model, units, total, per_module)


def _meta(arch: str, *, caffe_strides: bool = False, size: int = 224) -> Counted:
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None)
    if caffe_strides:  # the original (Caffe) ResNet-50: stride 2 in the first 1x1 conv
        for stage in (model.layer2, model.layer3, model.layer4):
            stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
    return _count(model, torch.zeros(1, 3, size, size, device="meta"))


@pytest.fixture(scope="module")
def vgg16() -> Counted:
    return _meta("vgg16")


@pytest.fixture(scope="module")
def resnet50() -> Counted:
    return _meta("resnet50")


@pytest.fixture(scope="module")
def caffe_resnet50() -> Counted:
    return _meta("resnet50", caffe_strides=True)


@pytest.fixture(scope="module")
def counted(vgg16, resnet50) -> dict[str, Counted]:
    return {"vgg16": vgg16, "resnet50": resnet50}


@contextmanager
def _one_thread():
    """Single-image forward passes are faster on one thread on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------ access


def test_names_lists_all_plans():
    assert plans.names() == ALL
    assert set(plans.PLANS) == set(ALL)


def test_get_returns_a_fresh_copy():
    first = plans.get("thinet_vgg16_conv")
    first["features.0"] = 1
    first["made.up"] = 3
    second = plans.get("thinet_vgg16_conv")
    assert second["features.0"] == 32
    assert "made.up" not in second
    assert second is not plans.get("thinet_vgg16_conv")


def test_plan_data_is_read_only():
    with pytest.raises(TypeError):
        plans.PLANS["thinet_vgg16_conv"].channels["features.0"] = 1  # type: ignore[index]


@pytest.mark.parametrize("bad", ["thinet", "THINET_VGG16_CONV", "", 3, None])
@pytest.mark.parametrize("func", [plans.get, plans.describe])
def test_unknown_name_raises_listing_the_names(func, bad):
    with pytest.raises(ValueError, match="'name' argument must be one of") as info:
        func(bad)
    for name in ALL:
        assert repr(name) in str(info.value)
    assert f"Got {bad!r} instead" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_describe_names_model_and_source(name):
    text = plans.describe(name)
    plan = plans.PLANS[name]
    assert text.startswith(f"{name}: for {plan.model}")
    assert plan.model in MODEL_OF
    assert plan.source in text
    assert ("ICCV 2017" in text) and ("He" in text or "Luo" in text)


# ------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", ALL)
def test_plan_units_exist_and_counts_fit(name, counted):
    model = counted[MODEL_OF[plans.PLANS[name].model]]
    widths = {u.name: u.width for u in model.units}
    channels = plans.get(name)
    assert channels
    assert set(channels) <= set(widths), set(channels) - set(widths)
    for unit, kept in channels.items():
        assert isinstance(kept, int)
        assert 1 <= kept <= widths[unit], (unit, kept, widths[unit])
        assert not unit.endswith(".sampler")


def test_vgg16_layer_names(vgg16):
    model = vgg16.model
    convs = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    tiny = plans.get("thinet_vgg16_tiny")
    assert list(tiny) == convs  # all 13, in order conv1_1 .. conv5_3
    assert [model.get_submodule(n).out_channels for n in convs][:3] == [64, 64, 128]
    assert list(plans.get("he2017_vgg16_5x")) == convs[:10]  # conv5_x kept
    assert list(plans.get("thinet_vgg16_conv")) == convs[:10]


@pytest.mark.parametrize(
    ("name", "widths"),
    [
        ("thinet_resnet50_30", (19, 38, 76, 153)),
        ("thinet_resnet50_50", (32, 64, 128, 256)),
        ("thinet_resnet50_70", (44, 89, 179, 358)),
    ],
)
def test_thinet_resnet50_prunes_every_inner_layer(name, widths, resnet50):
    inner = [
        u.name for u in resnet50.units if u.name.endswith((".conv1", ".conv2"))
    ]  # plain units of the bottlenecks' first two convs
    channels = plans.get(name)
    assert sorted(channels) == sorted(inner)
    assert len(channels) == 2 * (3 + 4 + 6 + 3)
    for unit, kept in channels.items():
        stage = int(unit[len("layer")])
        assert kept == widths[stage - 1]
    ratio = int(name.rsplit("_", 1)[1]) / 100
    assert widths == tuple(int(w * ratio) for w in (64, 128, 256, 512))  # authors' int()


# ----------------------------------------------------------------------------- sizes


def test_count_flops_counts_two_per_multiply_accumulate(vgg16):
    macs = 224 * 224 * 64 * 3 * 3 * 3  # conv1_1: output pixels x out x in x kh x kw
    assert vgg16.per_module["features.0"] == 2 * macs
    assert sum(vgg16.conv_flops.values()) / 2 == pytest.approx(15.35 * G, rel=1e-3)
    assert vgg16.total == 30_940_528_640  # 30.94 GFLOPs, the papers' VGG-16 figure


def test_he2017_vgg16_5x_conv_macs(vgg16):
    macs = vgg16.predict(plans.get("he2017_vgg16_5x"), conv_only=True) / 2
    assert macs == pytest.approx(3.39 * G, rel=0.01)
    assert sum(vgg16.conv_flops.values()) / 2 / macs == pytest.approx(4.53, rel=0.01)  # "5x"


def test_thinet_vgg16_conv_total(vgg16):
    flops = vgg16.predict(plans.get("thinet_vgg16_conv"))
    assert flops == pytest.approx(9.58 * G, rel=0.01)  # 4.79 G multiply-accumulates


def test_thinet_vgg16_tiny_conv_macs(vgg16):
    macs = vgg16.predict(plans.get("thinet_vgg16_tiny"), conv_only=True) / 2
    assert macs == pytest.approx(1.00 * G, rel=0.01)  # the paper's 2.01 GFLOPs


@pytest.mark.parametrize(
    ("name", "paper_gflops", "torchvision_gflops"),
    [
        ("thinet_resnet50_30", 2.20, 2.333),
        ("thinet_resnet50_50", 3.41, 3.644),
        ("thinet_resnet50_70", 4.88, 5.203),
    ],
)
def test_thinet_resnet50_flops(name, paper_gflops, torchvision_gflops, resnet50, caffe_resnet50):
    # On the Caffe ResNet-50 of the paper (7.72 GFLOPs), the published figures.
    caffe = caffe_resnet50
    assert caffe.total == pytest.approx(7.72 * G, rel=0.01)
    assert caffe.predict(plans.get(name)) == pytest.approx(paper_gflops * G, rel=0.01)
    # On torchvision's resnet50 (stride in the 3x3 conv, 8.18 GFLOPs), what we measure.
    assert resnet50.total == pytest.approx(8.18 * G, rel=0.01)
    assert resnet50.predict(plans.get(name)) == pytest.approx(torchvision_gflops * G, rel=0.01)


def test_prediction_matches_the_pruned_model():
    """Prune for real and count the result; cheaply: 32x32 images, no re-fit, and the
    plan's first block of every stage (the other blocks are the same computation)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    calib = torch.randn(1, 3, 32, 32)
    before = _count(model, calib)
    meta = _meta("resnet50", size=32)  # counting on the meta device, as above, is exact
    assert (meta.total, meta.per_module) == (before.total, before.per_module)
    channels = {k: v for k, v in plans.get("thinet_resnet50_50").items() if ".0.conv" in k}
    assert len(channels) == 8
    with _one_thread():
        result = recon.prune(
            model,
            calib,
            channels=channels,
            method="first_k",
            reconstruct="none",
            samples_per_image=1,
            progress=False,
        )
        after, _ = count_flops(result.model, calib)
    assert after == before.predict(channels)
    assert result.report.flops_after == after
    assert {k: v for k, v in result.channels.items() if k in channels} == channels
    block = result.model.layer3[0]
    assert (block.conv1.out_channels, block.conv2.out_channels) == (128, 128)
    assert block.conv3.out_channels == 1024
