"""Grouped convolutions (ResNeXt, RegNet): consumers re-fitted per group, producers
keeping as many outputs of every group."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_same_outputs
from _dist import run_ranks, values
from nets import quiet_prune, randomize_bn
from nets import rel_error as _rel
from torch import nn

import recon
from recon.budget import BudgetUnit, resolve_channels
from recon.graph import find_units
from recon.groups import dense_weight, quota_order
from recon.select import METHODS
from recon.stats import GroupedStats, PatchStats
from recon.surgery import slice_inputs, slice_outputs

X = torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(0))


class TinyResNeXt(nn.Module):
    """stem -> [1×1 -> grouped 3×3 (4 groups) -> 1×1] + identity -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyResNeXt()).eval()


def _prune(model: nn.Module, calib: torch.Tensor = X, **kwargs) -> recon.PruneResult:
    return quiet_prune(model, calib, **kwargs)


def _per_group(idx: list[int], width: int, groups: int) -> list[int]:
    return torch.bincount(torch.tensor(idx) // (width // groups), minlength=groups).tolist()


# --------------------------------------------------------------------------- tensors


def test_dense_weight_is_block_diagonal():
    w = torch.arange(1.0, 9.0).reshape(4, 2, 1)  # 4 outputs, 2 groups of 2 channels
    d = dense_weight(w, 2)[:, :, 0]
    assert d.tolist() == [[1, 2, 0, 0], [3, 4, 0, 0], [0, 0, 5, 6], [0, 0, 7, 8]]
    assert dense_weight(w, 1) is w
    with pytest.raises(ValueError, match=r"'weight'.*multiple of groups=3"):
        dense_weight(w, 3)


def test_quota_order_every_level_holds_one_channel_of_each_group():
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    q = quota_order(order, 12, 3)
    assert sorted(q.tolist()) == list(range(12))
    for j in range(1, 5):
        assert _per_group(q[: 3 * j].tolist(), 12, 3) == [j, j, j]
    # within a group, the order's preference is kept
    for g in range(3):
        mine = [int(i) for i in order if i // 4 == g]
        assert [int(i) for i in q if i // 4 == g] == mine
    assert quota_order(torch.tensor([0, 1, 3, 2]), 4, 2).tolist() == [0, 3, 1, 2]
    assert quota_order(order, 12, 1) is order


def test_grouped_stats_are_each_groups_own_statistics():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4 * 3, generator=gen), torch.randn(50, 6, generator=gen)
    folds = torch.arange(50) % 2
    grouped = GroupedStats([PatchStats(2, 3, 3, folds=2) for _ in range(2)], 3)
    grouped.update(x, y, folds)
    grouped.count_zeros(torch.tensor([[[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 2.0]]]))
    own = PatchStats(2, 3, 3, folds=2)  # group 1: channels 2-3, outputs 3-5
    own.update(x[:, 6:], y[:, 3:], folds)
    sub = grouped.subset(slice(2, 4), slice(3, 6))
    for name in ("Gf", "Cf", "sf", "tf", "yyf", "nf"):
        torch.testing.assert_close(getattr(sub, name), getattr(own, name))
    assert grouped.apoz.tolist() == [0.5, 1.0, 0.0, 0.5]
    assert grouped.count == 50 and grouped.channels == 4
    assert float(grouped.yy) == pytest.approx(float(y.double().square().sum()))
    assert len(grouped.tensors()) == 2 * len(own.tensors())
    with pytest.raises(ValueError, match="one group's slices"):
        grouped.subset(slice(1, 3), slice(3, 6))


# --------------------------------------------------------------------------- surgery


def test_slice_inputs_of_a_grouped_conv_keeps_each_groups_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, groups=2)
    x = torch.randn(2, 8, 5, 5)
    keep = torch.tensor([1, 3, 4, 6])  # 2 of each group
    cut = torch.zeros_like(x)
    cut[:, keep] = x[:, keep]
    want = conv(cut)
    slice_inputs(conv, keep)
    assert (conv.in_channels, conv.groups, tuple(conv.weight.shape)) == (4, 2, (4, 2, 3, 3))
    torch.testing.assert_close(conv(x[:, keep]), want)
    with pytest.raises(ValueError, match=r"'keep'.*each of the 2 groups.*\[1, 2\]"):
        slice_inputs(nn.Conv2d(8, 4, 3, groups=2), torch.tensor([0, 4, 5]))


def test_slice_outputs_of_a_grouped_conv_keeps_as_many_of_each_group():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 1, groups=2)
    x = torch.randn(2, 4, 3, 3)
    keep = torch.tensor([0, 2, 5, 7])
    want = conv(x)[:, keep]
    slice_outputs(conv, keep)
    torch.testing.assert_close(conv(x), want)
    with pytest.raises(ValueError, match="each of the 2 groups"):
        slice_outputs(nn.Conv2d(4, 8, 1, groups=2), torch.tensor([0, 1, 4]))


# --------------------------------------------------------------------------- graph


def test_grouped_convs_are_consumers_and_producers():
    graph = find_units(_net())
    units = {u.name: u for u in graph.units}
    assert set(units) == {"conv1.sampler", "conv1", "conv2"}
    assert (units["conv1"].consumer, units["conv1"].groups, units["conv1"].step) == (
        "conv2",
        4,
        4,
    )
    assert (units["conv2"].consumer, units["conv2"].producer_groups, units["conv2"].step) == (
        "conv3",
        4,
        4,
    )
    assert not graph.unsupported


@pytest.mark.parametrize(
    ("first", "second", "why"),
    [
        (nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, groups=8), "one channel per group"),
        (
            nn.Conv2d(3, 9, 3, groups=3),
            nn.Conv2d(9, 9, 3, groups=3),
            "grouped convolution (groups=3) reading the outputs of a grouped one (groups=3)",
        ),
    ],
    ids=["depth-multiplier", "grouped-after-grouped"],
)
def test_grouped_consumers_recon_cannot_refit_leave_their_producer_whole(first, second, why):
    last = nn.Conv2d(second.out_channels, 4, 1)
    graph = find_units(nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), last))
    assert why in graph.skipped["0"] and not graph.unsupported
    assert graph.names == ["2"] and graph.unit("2").producer_groups == second.groups


# --------------------------------------------------------------------------- pruning


def test_keeping_every_channel_reproduces_the_output():
    net = _net()
    res = _prune(net, keep_ratio=1.0)
    torch.testing.assert_close(res.model(X), net(X), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_equal_shares_of_every_group(method):
    net = _net()
    res = _prune(net, keep_ratio=0.5, method=method, sampler_layers=method != "bn_gamma")
    conv2 = res.model.conv2
    assert (conv2.in_channels, conv2.out_channels, conv2.groups) == (8, 8, 4)
    assert _per_group(res.kept["conv1"], 16, 4) == [2, 2, 2, 2]
    assert _per_group(res.kept["conv2"], 16, 4) == [2, 2, 2, 2]
    assert res.model(X).shape == (48, 5)
    assert _rel(res.model(X), net(X)) < 1.0


def test_the_per_group_refit_beats_no_refit_and_recovers_duplicated_channels():
    # conv1's channels come in duplicated pairs inside each group of conv2: half of them
    # carry everything, and re-fitting conv2 per group on them loses nothing.
    net = _net()
    with torch.no_grad():
        w = net.conv1.weight
        w[1::2] = w[0::2]
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(net.bn1, name)
            t[1::2] = t[0::2]
    res = _prune(net, channels={"conv1": 8}, method="obs")
    assert _per_group(res.kept["conv1"], 16, 4) == [2, 2, 2, 2]
    layer = next(r for r in res.report.layers if r.name == "conv1")
    assert layer.error_after < 1e-6 < layer.error_before
    assert "4 groups" in layer.note
    torch.testing.assert_close(res.model(X), net(X), atol=1e-3, rtol=1e-3)
    plain = _prune(net, channels={"conv1": 8}, method="obs", reconstruct="none")
    assert _rel(plain.model(X), net(X)) > 100 * _rel(res.model(X), net(X))


@pytest.mark.parametrize("allocation", ["auto", "uniform", "global"])
def test_a_speedup_target_is_met_in_multiples_of_the_groups(allocation):
    net = _net()
    method = "l1" if allocation == "global" else "lasso"
    res = _prune(net, speedup=1.5, allocation=allocation, method=method, round_to=2)
    assert res.report.speedup == pytest.approx(1.5, rel=0.02)
    for name in ("conv1", "conv2"):
        assert res.channels[name] % 4 == 0
    assert res.channels["conv1.sampler"] % 2 == 0


def test_channels_that_split_a_group_are_refused():
    with pytest.raises(ValueError, match=r"'channels\['conv1'\]'.*multiple of 4.*Got 6"):
        _prune(_net(), channels={"conv1": 6})


def test_budget_rounds_each_unit_to_its_groups():
    units = [BudgetUnit("a", 16, ("p",), ("q",), step=4), BudgetUnit("b", 16, ("q",), ("r",))]
    got = resolve_channels(units, keep_ratio=0.4, round_to=2)
    assert got == {"a": 8, "b": 6}  # 6.4 -> 6, up to a multiple of lcm(2, 4) / of 2
    got = resolve_channels(units, keep_ratio=0.3, round_to=1)
    assert got == {"a": 8, "b": 5}
    with pytest.raises(ValueError, match="step of unit 'c' must divide its width 10"):
        resolve_channels([BudgetUnit("c", 10, ("p",), ("q",), step=4)], keep_ratio=0.5)


def test_a_saved_grouped_model_loads_back(tmp_path):
    net = _net()
    res = _prune(net, speedup=1.5)
    recon.save(res, tmp_path / "small.pt")
    back = recon.load(tmp_path / "small.pt", lambda: TinyResNeXt().eval())
    torch.testing.assert_close(back(X), res.model(X))


def test_torchvision_resnext_prunes_with_the_refit():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    net = randomize_bn(ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8)).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = net(x)
    kw = {"speedup": 1.3, "method": "thinet", "allocation": "uniform"}  # auto: other tests
    fitted = _prune(net, x, **kw)
    none = _prune(net, x, reconstruct="none", **kw)
    assert fitted.report.speedup == pytest.approx(1.3, rel=0.02)
    assert fitted.model.layer1[0].conv2.groups == 4
    assert _rel(fitted.model(x), ref) < _rel(none.model(x), ref)
    assert torchvision is not None


class TinyRegNetY(nn.Module):
    """stem -> [1×1 -> grouped 3×3 -> squeeze-excitation -> 1×1] + 1×1 projection: both
    operands of the add end in one conv, and the branch is the one that forks later."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bnb = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.c, self.bnc = nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.proj, self.bnp = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bnb(self.b(F.relu(self.bna(self.a(x))))))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        x = F.relu(self.bnp(self.proj(x)) + self.bnc(self.c(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_branch_that_forks_after_its_shortcut_is_the_branch():
    torch.manual_seed(0)
    net = randomize_bn(TinyRegNetY()).eval()
    graph = find_units(net)
    assert not graph.unsupported
    (block,) = graph.blocks
    assert block.convs == ("c",) and block.shortcut.startswith("bnp")
    assert "a" in graph.names and graph.unit("a").groups == 4
    torch.testing.assert_close(_prune(net, keep_ratio=1.0).model(X), net(X))
    fitted = _prune(net, channels={"a": 8}, method="thinet")
    none = _prune(net, channels={"a": 8}, method="thinet", reconstruct="none")
    assert _rel(fitted.model(X), net(X)) < _rel(none.model(X), net(X))


def _rank_grouped(rank: int, world: int) -> dict:
    res = _prune(_net(), X.split(6), speedup=1.5)  # auto: the profile is all-reduced too
    return {"kept": res.kept, "out": res.model(X).detach()}


@pytest.mark.slow  # 15 s of process start-up; the default run checks GroupedStats.tensors
def test_two_ranks_give_the_one_process_grouped_model():
    ranks = values(run_ranks(_rank_grouped, timeout=240))
    single = _prune(_net(), X.split(8), speedup=1.5)
    assert ranks[0]["kept"] == ranks[1]["kept"] == single.kept
    assert torch.equal(ranks[0]["out"], ranks[1]["out"])  # rank 0's weights everywhere
    assert_same_outputs(ranks[0]["out"], single.model(X).detach())


@pytest.mark.slow  # minutes: torchvision's ResNeXt-50 at 224 px
def test_torchvision_resnext50_at_224_px():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = randomize_bn(torchvision.models.resnext50_32x4d(weights=None)).eval()
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    kw = {"speedup": 1.5, "method": "thinet", "allocation": "uniform"}
    fitted = _prune(net, x, **kw)
    none = _prune(net, x, reconstruct="none", **kw)
    assert fitted.report.speedup == pytest.approx(1.5, rel=0.02)
    assert fitted.report.output_error < none.report.output_error
    assert fitted.model.layer4[0].conv2.groups == 32
    assert fitted.channels["layer4.0.conv1"] % 32 == 0
