"""Depthwise convolutions cut along with their producer: inverted residuals, MobileNetV2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nets import quiet_prune, randomize_bn
from nets import rel_error as _rel
from torch import nn

import recon
from recon.graph import find_units
from recon.layers import SampledConv2d
from recon.select import METHODS

X = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _dw(c: int, *, stride: int = 1, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 3×3 depthwise conv (groups = in = out channels)."""
    return nn.Conv2d(c, c, 3, stride, padding=dilation, dilation=dilation, groups=c, bias=bias)


class InvertedResidual(nn.Module):
    """1×1 expand -> BN -> ReLU6 -> depthwise 3×3 -> BN -> ReLU6 -> 1×1 project -> BN
    (+ the input when the shape allows)."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        hidden = 2 * cin
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = _dw(hidden, stride=stride, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        y = self.bn3(self.project(y))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    """MobileNetV2 in miniature: a stem, a block without expansion (as MobileNetV2's
    first), a stride-2 block, two residual blocks (one dilated), a 1×1 head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.first = nn.Sequential(
            nn.ReLU6(),
            _dw(8, bias=True),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.blocks = nn.Sequential(
            InvertedResidual(8, 12, stride=2),
            InvertedResidual(12, 12),
            InvertedResidual(12, 12, dilation=2),
        )
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.fc = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.first(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyMobileNet()).eval()


def _prune(model: nn.Module, calib: torch.Tensor = X, **kwargs) -> recon.PruneResult:
    return quiet_prune(model, calib, **kwargs)


def _block(i: int) -> tuple[str, str]:
    """Block ``i``'s (expand conv, channel-wise modules between it and the project conv)."""
    p = f"blocks.{i}."
    return p + "expand", (p + "bn1", p + "dw", p + "bn2")


# --------------------------------------------------------------------------- graph

EXPECTED = {  # unit -> (consumer, channel-wise modules)
    "stem.0": ("first.4", ("stem.1", "first.1", "first.2")),
    "first.4": ("blocks.0.expand", ("first.5",)),
    "blocks.0.expand": ("blocks.0.project", _block(0)[1]),
    "blocks.1.expand.sampler": ("blocks.1.expand", ()),
    "blocks.1.expand": ("blocks.1.project", _block(1)[1]),
    "blocks.2.expand.sampler": ("blocks.2.expand", ()),
    "blocks.2.expand": ("blocks.2.project", _block(2)[1]),
    "head.0": ("fc", ("head.1",)),
}


def test_units_cut_the_depthwise_conv_and_both_batchnorms():
    graph = find_units(_net())
    assert graph.names == list(EXPECTED)
    for unit in graph.units:
        assert (unit.consumer, unit.channelwise) == EXPECTED[unit.name]
    assert graph.unit("head.0").consumer_kind == "linear"
    assert not graph.unsupported
    for name in ("first.1", "blocks.0.dw", "blocks.2.dw"):
        assert "depthwise" in graph.skipped[name]
        assert "cut as a channel-wise op with the unit" in graph.skipped[name]
    assert "coupled" in graph.skipped["blocks.0.project"]


def test_residual_blocks_see_through_the_depthwise_conv():
    graph = find_units(_net())
    assert [b.name for b in graph.blocks] == ["blocks.1", "blocks.2"]
    for b in graph.blocks:
        assert b.convs == (f"{b.name}.expand", f"{b.name}.dw", f"{b.name}.project")
        assert b.sampler and b.linear_tail and b.bn == f"{b.name}.bn3"


def test_a_depthwise_conv_is_never_a_producer_or_consumer():
    # Its producer is coupled (read by two branches): the depthwise conv is left alone.
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.dw = nn.Conv2d(3, 8, 1), _dw(8)
            self.b, self.c = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.a(x)
            return self.b(F.relu(self.dw(x))) + self.c(x)

    graph = find_units(Fork())
    assert "a" not in graph.names and "dw" not in graph.names
    assert "no unit reaches it" in graph.skipped["dw"]
    assert not graph.unsupported


def test_a_depthwise_conv_recon_cannot_slice_keeps_its_producer_whole():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(8, 4, 1))
    graph = find_units(net)
    assert graph.names == [] and not graph.unsupported
    assert "depthwise convolution '2' cannot be cut along" in graph.skipped["0"]
    assert "padding_mode='reflect'" in graph.skipped["0"]


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("conv", "why"),
    [
        (nn.Conv2d(8, 16, 3, padding=1, groups=8), "depth multiplier 2 (groups=8, 8 -> 16"),
        (nn.Conv2d(8, 16, 3, padding=1, groups=4), None),
    ],
    ids=["depth-multiplier", "grouped"],
)
def test_grouped_and_depth_multiplier_convs_are_producers(conv, why):
    # see test_grouped.py; a depth multiplier conv reads one channel per group, so its
    # producer is left whole
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(16, 4, 1))
    graph = find_units(net)
    assert graph.unit("2").producer_groups == conv.groups and not graph.unsupported
    if why is None:
        assert graph.unit("0").groups == conv.groups
    else:
        assert why in graph.skipped["0"] and "one channel per group" in graph.skipped["0"]
    res = _prune(net, X, keep_ratio=0.5)
    assert res.model[2].out_channels == 8 and res.model[2].groups == conv.groups


class SqueezeExcite(nn.Module):
    """expand -> BN -> ReLU -> depthwise -> BN -> ReLU -> x * gate(x) -> project."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = _dw(8), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.project = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = F.relu(self.bn2(self.dw(F.relu(self.bn1(self.expand(x))))))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.project(x * gate)


def test_squeeze_and_excitation_is_cut_along_with_its_producer():
    graph = find_units(SqueezeExcite())
    assert graph.names == ["fc1", "expand"]  # the gate's own squeeze is a unit too
    unit = graph.unit("expand")
    assert unit.gate == ("fc1", "fc2") and unit.consumer == "project"
    assert unit.channelwise == ("bn1", "dw", "bn2") and not graph.unsupported
    net = randomize_bn(SqueezeExcite()).eval()
    torch.testing.assert_close(_prune(net, X, keep_ratio=1.0).model(X), net(X))
    m = _prune(net, X, channels={"expand": 4}).model
    assert (m.expand.out_channels, m.dw.groups, m.fc1.in_channels, m.fc2.out_channels) == (4,) * 4
    assert m.project.in_channels == 4 and m(X).shape == net(X).shape


def _gate(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The squeeze-and-excitation gate of SqueezeExcite, (B, c)."""
    with torch.no_grad():
        y = F.relu(net.bn2(net.dw(F.relu(net.bn1(net.expand(x))))))
        return torch.sigmoid(net.fc2(F.relu(net.fc1(F.adaptive_avg_pool2d(y, 1))))).flatten(1)


def test_the_squeeze_is_refitted_so_the_gate_stays_as_it_was():
    # Duplicated channel pairs: one of each pair carries everything, so re-fitting the
    # squeeze (fc1) on the kept ones keeps the gate of the kept channels exactly;
    # slicing it alone (no re-fit) does not.
    torch.manual_seed(0)
    net = randomize_bn(SqueezeExcite()).eval()
    with torch.no_grad():
        for mod in (net.expand, net.dw, net.bn1, net.bn2):
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(mod, name, None)
                if t is not None:
                    t[1::2] = t[0::2]
    fitted = _prune(net, X, channels={"expand": 4}, method="obs")
    kept = fitted.kept["expand"]
    assert len({i // 2 for i in kept}) == 4  # one of each pair
    torch.testing.assert_close(_gate(fitted.model, X), _gate(net, X)[:, kept])
    with torch.no_grad():  # the same channels, fc1 only sliced
        y = F.relu(net.bn2(net.dw(F.relu(net.bn1(net.expand(X))))))[:, kept]
        z = F.relu(F.conv2d(F.adaptive_avg_pool2d(y, 1), net.fc1.weight[:, kept], net.fc1.bias))
        sliced = torch.sigmoid(F.conv2d(z, net.fc2.weight[kept], net.fc2.bias[kept])).flatten(1)
    assert (sliced - _gate(net, X)[:, kept]).abs().max() > 1e-3
    assert _rel(fitted.model(X), net(X)) < 1e-5


# --------------------------------------------------------------------------- pruning


def test_keep_all_reproduces_the_outputs():
    net = _net()
    result = _prune(net, keep_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(result.model(X), net(X), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def half():
    return _net(), _prune(_net(), keep_ratio=0.5)


def test_half_cuts_the_depthwise_convs_with_their_producers(half):
    net, result = half
    m = dict(result.model.named_modules())
    graph = find_units(net)
    for unit in graph.units:
        k = unit.width // 2
        assert result.channels[unit.name] == k
        if unit.kind == "sampler":
            assert isinstance(m[unit.consumer], SampledConv2d)
            assert len(m[unit.consumer].sampler.index) == k
            continue
        assert m[unit.producer].out_channels == k
        for name in unit.channelwise:
            if isinstance(m[name], nn.BatchNorm2d):
                assert m[name].num_features == k
            else:
                dw = m[name]
                assert dw.in_channels == dw.out_channels == dw.groups == k
                assert dw.weight.shape == (k, 1, 3, 3)
                assert dw.bias is None or dw.bias.shape == (k,)
        consumer = m[unit.consumer]
        linear = unit.consumer_kind == "linear"
        assert (consumer.in_features if linear else consumer.in_channels) == k * (
            unit.taps if linear else 1
        )
    assert m["blocks.2.dw"].dilation == (2, 2) and m["blocks.0.dw"].stride == (2, 2)
    assert m["first.1"].bias.shape == (4,)
    with torch.no_grad():
        assert result.model(X).shape == (32, 5)


def test_refitting_beats_no_refit(half):
    net, lstsq = half
    none = _prune(_net(), keep_ratio=0.5, reconstruct="none")
    with torch.no_grad():
        ref = net(X)
        assert _rel(lstsq.model(X), ref) < _rel(none.model(X), ref)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(method):
    # bn_gamma has no score for a sampler unit (a block input has no BatchNorm of its own)
    result = _prune(_net(), keep_ratio=0.5, method=method, sampler_layers=method != "bn_gamma")
    assert result.model.blocks[0].dw.groups == 8
    with torch.no_grad():
        assert torch.isfinite(result.model(X)).all()


def test_bn_gamma_reads_the_batchnorm_right_after_the_producer():
    net = _net()
    result = _prune(net, channels={"blocks.0.expand": 5}, method="bn_gamma")
    gamma = net.blocks[0].bn1.weight.detach().abs()  # not bn2, after the depthwise conv
    assert result.kept["blocks.0.expand"] == sorted(gamma.topk(5).indices.tolist())


def test_save_load_and_apply_plan_reproduce_the_pruned_model(half, tmp_path):
    _, result = half
    path = tmp_path / "dw.recon"
    recon.save(result, path)
    with torch.no_grad():
        expected = result.model(X)
        assert torch.equal(recon.load(path, _net).eval()(X), expected)
        fresh = recon.apply_plan(_net(), result.plan)
        fresh.load_state_dict(result.model.state_dict())
        assert torch.equal(fresh.eval()(X), expected)


def test_apply_plan_names_a_conv_that_is_not_depthwise(half):
    _, result = half
    other = _net()
    other.blocks[0].dw = nn.Conv2d(16, 16, 3, padding=1)
    with pytest.raises(ValueError, match=r"'blocks\.0\.dw' is not a depthwise convolution"):
        recon.apply_plan(other, result.plan)


def test_speedup_counts_the_depthwise_flops():
    result = _prune(_net(), speedup=2.0)
    assert result.report.speedup == pytest.approx(2.0, rel=0.02)


# --------------------------------------------------------------------------- torchvision


def _mobilenet_v2(width_mult: float = 1.0) -> nn.Module:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return randomize_bn(tv.models.mobilenet_v2(weights=None, width_mult=width_mult)).eval()


def _check_mobilenet(net: nn.Module, x: torch.Tensor) -> None:
    graph = find_units(net)
    assert not graph.unsupported
    expand = [f"features.{i}.conv.0.0" for i in range(2, 18)]
    assert {"features.0.0", *expand} <= set(graph.names)  # the stem and every expand conv
    assert graph.unit("features.0.0").channelwise == (
        "features.0.1",
        "features.1.conv.0.0",
        "features.1.conv.0.1",
    )
    result = _prune(net, x, speedup=1.5, allocation="uniform")
    assert result.report.speedup == pytest.approx(1.5, rel=0.02)
    with torch.no_grad():
        out = result.model(x)
    assert out.shape == (len(x), 1000) and torch.isfinite(out).all()


# Coordinate-descent LASSO on the widest random-weight layers may stop short of its
# tolerance; the selection is still made.
_CD = "ignore:Objective did not converge"


@pytest.mark.filterwarnings(_CD)
def test_mobilenet_v2_small():
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _check_mobilenet(_mobilenet_v2(width_mult=0.5), x)


@pytest.mark.slow
@pytest.mark.filterwarnings(_CD)
def test_mobilenet_v2():
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _check_mobilenet(_mobilenet_v2(), x)


def test_a_squeeze_and_excitation_model_saves_and_loads(tmp_path):
    net = randomize_bn(SqueezeExcite()).eval()
    result = _prune(net, X, channels={"expand": 4})
    recon.save(result, tmp_path / "se.pt")
    back = recon.load(tmp_path / "se.pt", lambda: SqueezeExcite().eval())
    torch.testing.assert_close(back(X), result.model(X))
    assert result.plan["units"]["expand"]["gate"] == ["fc1", "fc2"]


@pytest.mark.filterwarnings(_CD)
def test_mobilenet_v3_small_reaches_2x_with_its_gates_cut():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = randomize_bn(tv.models.mobilenet_v3_small(weights=None)).eval()
    assert sum(u.gate is not None for u in find_units(net).units) == 9  # every SE block
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = _prune(net, x, speedup=2.0, allocation="uniform")  # was at most 1.47x
    assert result.report.speedup == pytest.approx(2.0, rel=0.02)
    fc1 = result.model.features[4].block[2].fc1
    assert fc1.in_channels == result.channels["features.4.block.0.0"]


def _se_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SqueezeExcite()).eval()


def _rank_se(rank: int, world: int) -> dict:
    res = _prune(_se_net(), X.split(6), channels={"expand": 4})
    return {"kept": res.kept, "out": res.model(X).detach()}


@pytest.mark.slow  # process start-up; the gate's sums join the all-reduce (gather.stats_tensors)
def test_two_ranks_give_the_one_process_gated_model():
    from _compare import assert_same_outputs
    from _dist import run_ranks, values

    ranks = values(run_ranks(_rank_se, timeout=240))
    single = _prune(_se_net(), X.split(8), channels={"expand": 4})
    assert ranks[0]["kept"] == ranks[1]["kept"] == single.kept
    assert torch.equal(ranks[0]["out"], ranks[1]["out"])
    assert_same_outputs(ranks[0]["out"], single.model(X).detach())
