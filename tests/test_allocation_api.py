"""recon.prune(..., allocation=): data-driven channel counts under a FLOPs target."""

from __future__ import annotations

import pytest
import torch
from _dist import run_ranks, values
from nets import randomize_bn
from torch import nn

import recon
from recon import models
from recon.report import Report


class _Chain(nn.Module):
    """conv1 -> conv2 -> conv3 -> linear, conv1's 16 filters 8 pairs of copies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


def _redundant_chain() -> nn.Module:
    torch.manual_seed(0)
    net = _Chain().eval()
    with torch.no_grad():  # channels 8..15 of conv1 copy 0..7; conv2 reads copies alike
        net.conv1.weight[8:] = net.conv1.weight[:8]
        net.conv1.bias[8:] = net.conv1.bias[:8]
        net.conv2.weight[:, 8:] = net.conv2.weight[:, :8]
    return net


def _images(n: int = 96, size: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _prune(net, x, **kwargs) -> recon.PruneResult:
    return recon.prune(net, x, progress=False, **kwargs)


def _assert_flops_met(result: recon.PruneResult, speedup: float) -> None:
    target = result.report.flops_before / speedup
    assert abs(result.report.flops_after / target - 1) <= 0.02


def test_auto_prunes_the_redundant_layer_harder_within_the_flops_target():
    net, x = _redundant_chain(), _images()
    auto = _prune(net, x, speedup=2.0, allocation="auto")
    uniform = _prune(net, x, speedup=2.0, allocation="uniform")
    ratio = {n: auto.channels[n] / 16 for n in ("conv1", "conv2")}
    assert ratio["conv1"] < ratio["conv2"]
    assert auto.channels["conv1"] <= 8  # the copies go first
    _assert_flops_met(auto, 2.0)
    assert auto.report.output_error < uniform.report.output_error
    rows = {r.name: r for r in auto.report.allocation.rows}
    assert rows["conv1"].chosen == auto.channels["conv1"]
    assert rows["conv1"].uniform == uniform.channels["conv1"]
    assert auto.report.allocation.cost <= auto.report.allocation.cost_uniform + 1e-12
    for row in rows.values():  # each unit's cost curve, read at the uniform and chosen counts
        curve = dict(zip(row.counts, row.costs, strict=True))
        assert row.counts == sorted(row.counts) and row.counts[-1] <= row.width
        assert row.counts[-1] == row.width or row.trust < 1  # the window of a trusted unit
        assert curve[row.chosen] == row.cost and curve[row.uniform] == row.cost_uniform
    assert auto.report.phases["profile"] > 0
    assert auto.plan["options"]["allocation"] == "auto"


def test_auto_is_the_default_for_a_speedup_and_uniform_stays_as_it_was():
    net, x = randomize_bn(models.vgg11(width=0.125)).eval(), _images(64, 32)
    default = _prune(net, x, speedup=2.0)
    auto = _prune(net, x, speedup=2.0, allocation="auto")
    assert recon.api.DEFAULT_ALLOCATION == "auto"
    assert default.channels == auto.channels and default.report.allocation is not None
    a, b = default.model.state_dict(), auto.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert default.plan["options"]["allocation"] == "auto"
    uniform = _prune(net, x, speedup=2.0, allocation="uniform")
    assert uniform.report.allocation is None and "profile" not in uniform.report.phases
    widths = {u: len(k) for u, k in uniform.kept.items()}
    ratios = {round(uniform.channels[u] / widths[u], 1) for u in widths}
    assert len(ratios) == 1, ratios  # one keep ratio for every layer
    assert uniform.plan["options"]["allocation"] == "uniform"
    keep = _prune(net, x, keep_ratio=0.5)  # explicit counts: no allocation, no profile
    assert keep.report.allocation is None and "profile" not in keep.report.phases


@pytest.mark.parametrize("bad", ["Auto", "even", 1, ""])
def test_a_bad_allocation_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="'allocation' argument must be one of"):
        _prune(_redundant_chain(), _images(8), speedup=2.0, allocation=bad)


@pytest.mark.parametrize("target", [{"keep_ratio": 0.5}, {"channels": {"conv1": 4}}])
def test_auto_needs_a_speedup_target(target):
    with pytest.raises(ValueError, match="'allocation' argument 'auto' applies to a 'speedup'"):
        _prune(_redundant_chain(), _images(8), allocation="auto", **target)
    _prune(_redundant_chain(), _images(8), **target)  # the default is fine with them


def test_auto_honours_round_to_and_ignored_layers_and_is_deterministic():
    net, x = randomize_bn(models.vgg11(width=0.125)).eval(), _images(64, 32)
    kwargs = {"speedup": 2.0, "allocation": "auto", "round_to": 4, "ignored_layers": ["features.4"]}
    first, again = _prune(net, x, **kwargs), _prune(net, x, **kwargs)
    assert first.channels == again.channels
    widths = {u: len(k) for u, k in first.kept.items()}
    full = {u: first.report.allocation.rows for u in widths}
    assert first.channels["features.4"] == 16
    for unit, count in first.channels.items():
        assert count % 4 == 0 or count == widths[unit], (unit, count)
    assert "features.4" not in {r.name for r in first.report.allocation.rows}
    assert full
    _assert_flops_met(first, 2.0)


def test_auto_allocates_samplers_and_inner_units_of_a_resnet_together():
    net = randomize_bn(models.cifar_resnet20(width=0.25)).eval()
    result = _prune(net, _images(48, 16), speedup=2.0, allocation="auto", method="thinet")
    names = {r.name for r in result.report.allocation.rows}
    assert any(n.endswith(".sampler") for n in names) and "layer1.0.conv1" in names
    _assert_flops_met(result, 2.0)
    assert result.report.output_error is not None


def test_the_report_with_an_allocation_round_trips_and_old_reports_load():
    result = _prune(_redundant_chain(), _images(32), speedup=2.0, allocation="auto")
    report = result.report
    assert Report.from_json(report.to_json()) == report
    assert "cost chosen" in report.to_text() and "predicted output error" in report.to_text()
    assert report.allocation.rows[0].costs  # the curves travel too
    old = report.to_dict()
    for row in old["allocation"]["rows"]:  # saved before the curves were recorded
        del row["counts"], row["costs"]
    assert Report.from_dict(old).allocation.rows[0].costs == []
    del old["allocation"]
    assert Report.from_dict(old).allocation is None


def _rank_auto(rank: int, world: int) -> dict:
    result = _prune(_redundant_chain(), _images(64), speedup=2.0, allocation="auto")
    return {"channels": result.channels, "kept": result.kept}


def test_two_ranks_allocate_the_same_channels_as_one_process():
    got = values(run_ranks(_rank_auto, world=2))
    assert got[0] == got[1]
    one = _prune(_redundant_chain(), _images(64), speedup=2.0, allocation="auto")
    assert got[0]["channels"] == one.channels  # each rank its share of the images, summed
