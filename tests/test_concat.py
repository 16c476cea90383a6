"""Concatenations (SqueezeNet's fire modules): a producer owns a slice of its consumer's
input; only that slice is cut and re-fitted."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _compare import assert_same_outputs
from _dist import run_ranks, values
from nets import quiet_prune, randomize_bn, rel_error
from test_allocate import assert_matches_brute_force
from torch import nn

import recon
from recon.allocate import allocate, count_grid
from recon.budget import BudgetUnit, predict_flops
from recon.graph import find_units
from recon.scores import global_scores
from recon.select import METHODS
from recon.surgery import channel_offset, prune_unit

X = torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(0))


class TinyFire(nn.Module):
    """stem -> fire (squeeze -> [expand 1×1 ‖ expand 3×3]) -> max pool -> fire -> head.

    The second squeeze has a BatchNorm and no bias, so a re-fit's bias change goes into
    the BatchNorm's running mean."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.sq1 = nn.Conv2d(12, 6, 1)
        self.e1a, self.e3a = nn.Conv2d(6, 8, 1), nn.Conv2d(6, 8, 3, padding=1)
        self.sq2, self.bn2 = nn.Conv2d(16, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.e1b, self.e3b = nn.Conv2d(6, 10, 1), nn.Conv2d(6, 10, 3, padding=1)
        self.head = nn.Conv2d(20, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        s = F.relu(self.sq1(x))
        x = torch.cat([F.relu(self.e1a(s)), F.relu(self.e3a(s))], 1)
        s = F.relu(self.bn2(self.sq2(F.max_pool2d(x, 2))))
        x = torch.cat([F.relu(self.e1b(s)), F.relu(self.e3b(s))], dim=1)
        return F.adaptive_avg_pool2d(F.relu(self.head(x)), 1).flatten(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyFire()).eval()


def _output(model: nn.Module, name: str, x: torch.Tensor = X) -> torch.Tensor:
    got = {}
    hook = model.get_submodule(name).register_forward_hook(lambda m, i, o: got.update(y=o))
    with torch.no_grad():
        model(x)
    hook.remove()
    return got["y"]


# --------------------------------------------------------------------------- graph


def test_each_operand_of_a_concatenation_is_a_unit_of_its_reader():
    graph = find_units(_net())
    found = {u.name: (u.consumer, u.cat_lead) for u in graph.units}
    assert found == {
        "stem": ("sq1", None),
        "e1a": ("sq2", ()),
        "e3a": ("sq2", ("e1a",)),
        "e1b": ("head", ()),
        "e3b": ("head", ("e1b",)),
    }
    assert "used by 2 nodes" in graph.skipped["sq1"]  # both expands read the squeeze
    assert graph.unit("e1b").consumer_bn is None and graph.unit("e1a").consumer_bn == "bn2"


class _Cat(nn.Module):
    """Two convs concatenated, then ``tail``."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = tail
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn, self.c, self.d = nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        if self.tail == "dim0":
            return self.c(torch.cat([a, b], 0))
        if self.tail == "twice":
            return self.c(torch.cat([b, b], 1)) + a.sum()
        y = torch.cat([a, b], 1)
        if self.tail == "bn":
            return self.c(self.bn(y))
        if self.tail == "two readers":
            return self.c(y) + self.d(y)
        if self.tail == "linear":
            return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))
        return self.c(y)


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        ("dim0", "not along channels"),
        ("twice", "the same value twice"),
        ("bn", "read by 'bn' \\(BatchNorm2d\\)"),
        ("two readers", "used by 2 nodes"),
        ("linear", "then flattened"),
    ],
)
def test_concatenations_recon_cannot_cut_along_say_why(tail, why):
    graph = find_units(_Cat(tail))
    assert "b" not in graph.names
    assert re.search(why, graph.skipped["b"])


def test_slicing_a_concatenated_unit_equals_masking_its_channels():
    net = _net()
    unit = find_units(net).unit("e3a")
    keep = torch.tensor([1, 4, 6])
    masked = _net()
    with torch.no_grad():
        drop = torch.ones(8, dtype=torch.bool)
        drop[keep] = False
        masked.e3a.weight[drop] = 0
        masked.e3a.bias[drop] = 0  # relu(0) = 0: the channel reads as absent
    assert channel_offset(net, unit) == 8
    prune_unit(net, unit, keep)
    assert (net.e3a.out_channels, net.sq2.in_channels) == (3, 11)
    torch.testing.assert_close(net(X), masked(X))
    prune_unit(net, find_units(_net()).unit("e1a"), torch.tensor([0, 5]))
    assert net.sq2.in_channels == 5 and net(X).shape == (48, 5)


# --------------------------------------------------------------------------- pruning


def test_keeping_every_channel_reproduces_the_output():
    net = _net()
    res = quiet_prune(net, X, keep_ratio=1.0)
    torch.testing.assert_close(res.model(X), net(X), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "bn_gamma"])  # no BatchNorms
def test_every_method_prunes_the_concatenated_units(method):
    net = _net()
    res = quiet_prune(net, X, keep_ratio=0.5, method=method)
    m = res.model
    assert (m.e1a.out_channels, m.e3a.out_channels, m.sq2.in_channels) == (4, 4, 8)
    assert (m.e1b.out_channels, m.e3b.out_channels, m.head.in_channels) == (5, 5, 10)
    assert rel_error(res.model(X), net(X)) < 1.0


def test_the_slice_refit_recovers_duplicated_channels():
    # e3a's channels come in duplicated pairs: half of them carry everything, and
    # re-fitting sq2's weights on that slice (the e1a slice unchanged) loses nothing.
    net = _net()
    with torch.no_grad():
        net.e3a.weight[1::2] = net.e3a.weight[0::2]
        net.e3a.bias[1::2] = net.e3a.bias[0::2]
    res = quiet_prune(net, X, channels={"e3a": 4}, method="obs")
    layer = next(r for r in res.report.layers if r.name == "e3a")
    assert layer.error_after < 1e-6 < layer.error_before
    assert "channels 8..15 of a concatenation" in layer.note
    torch.testing.assert_close(res.model(X), net(X), atol=1e-3, rtol=1e-3)
    plain = quiet_prune(net, X, channels={"e3a": 4}, method="obs", reconstruct="none")
    assert rel_error(plain.model(X), net(X)) > 100 * rel_error(res.model(X), net(X))


def _offset(model: nn.Module, consumer: str) -> torch.Tensor:
    """What the consumer adds to its output: its bias, or less the BatchNorm's mean."""
    if consumer == "sq2":
        return -model.bn2.running_mean.detach().clone()
    return model.head.bias.detach().clone()


@pytest.mark.parametrize("consumer", ["sq2", "head"])  # bias change in a BatchNorm / a bias
def test_a_second_refit_of_a_shared_consumer_counts_the_first_ones_bias_change(consumer):
    # The first slice's re-fit (one channel left) moves the consumer's bias; the second
    # slice loses one channel, so its re-fit has little to change. Not counting the
    # first change, it adds it again (and the output error grew 3000-fold for 'head').
    net = _net()
    first, second = ("e1a", "e3a") if consumer == "sq2" else ("e1b", "e3b")
    width = net.get_submodule(second).out_channels
    one = quiet_prune(net, X, channels={first: 1}, method="lasso")
    both = quiet_prune(net, X, channels={first: 1, second: width - 1}, method="lasso")
    moved = _offset(one.model, consumer) - _offset(net, consumer)
    again = _offset(both.model, consumer) - _offset(one.model, consumer)
    assert float(moved.norm()) > 1e-3
    assert float(again.norm()) < 0.5 * float(moved.norm())
    ref = _output(net, consumer)
    assert rel_error(_output(both.model, consumer), ref) < 1.1 * rel_error(
        _output(one.model, consumer), ref
    )


def test_the_refit_beats_no_refit():
    net = _net()
    kw = {"speedup": 1.6, "method": "lasso"}
    fitted, none = quiet_prune(net, X, **kw), quiet_prune(net, X, reconstruct="none", **kw)
    assert fitted.report.output_error < none.report.output_error


@pytest.mark.parametrize("allocation", ["auto", "uniform"])
def test_a_speedup_target_is_met(allocation):
    res = quiet_prune(_net(), X, speedup=1.6, allocation=allocation, method="lasso")
    assert res.report.speedup == pytest.approx(1.6, rel=0.02)


def test_global_apoz_counts_the_zeros_of_each_units_own_slice():
    net = _net()
    units = find_units(net).units
    got = global_scores("apoz", units, net, [X])
    with torch.no_grad():
        s = F.relu(net.sq1(F.relu(net.stem(X))))
        own = F.relu(net.e3a(s))  # what sq2 reads (after the max pool) from e3a
        own = F.max_pool2d(own, 2)
    expected = 1 - (own == 0).double().mean(dim=(0, 2, 3))  # a score: larger is kept
    torch.testing.assert_close(got["e3a"], expected)


@pytest.mark.parametrize("method", ["l1", "apoz"])
def test_a_global_ranking_counts_the_slices(method):
    # One channel of this tiny net can move the FLOPs by more than 2 %: recon then says
    # so and lands on the nearest step, which the budget predicted (the slices' shares).
    # APoZ counts the zeros of each unit's own slice of the reader's input.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = quiet_prune(_net(), X, speedup=1.6, allocation="global", method=method)
    coarse = any("changes the FLOPs by more than 2 %" in str(w.message) for w in caught)
    assert res.report.speedup == pytest.approx(1.6, rel=0.05 if coarse else 0.02)


def test_saved_and_replayed_plans_reproduce_the_pruned_model(tmp_path):
    res = quiet_prune(_net(), X, speedup=1.6, method="lasso")
    expected = res.model(X)
    recon.save(res, tmp_path / "fire.pt")
    torch.testing.assert_close(
        recon.load(tmp_path / "fire.pt", lambda: TinyFire().eval())(X), expected
    )
    fresh = recon.apply_plan(_net(), res.plan)
    assert [m.weight.shape for m in fresh.modules() if isinstance(m, nn.Conv2d)] == [
        m.weight.shape for m in res.model.modules() if isinstance(m, nn.Conv2d)
    ]


# --------------------------------------------------------------------------- budget


def test_a_module_read_in_part_scales_with_the_shares_it_loses():
    a = BudgetUnit("a", 4, ("pa",), ("c",), in_shares=(0.25,))
    b = BudgetUnit("b", 8, ("pb",), ("c",), in_shares=(0.5,))  # the rest: 0.25 fixed
    flops = {"pa": 40, "pb": 80, "c": 100}
    # c: 100 * (1 - 0.25 * 0.5 - 0.5 * 0.75) = 50, pa 20, pb 20, the other 80 as they were
    assert predict_flops([a, b], {"a": 2, "b": 2}, flops, 300) == pytest.approx(170)
    with pytest.raises(ValueError, match="in_shares of unit 'a' must be one number in"):
        predict_flops([BudgetUnit("a", 4, ("p",), ("c",), in_shares=(1.5,))], {}, flops, 1)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_over_concatenated_units_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    units = [
        BudgetUnit("stem", 4, ("stem",), ("sq",)),
        BudgetUnit("e1", 4, ("e1",), ("next",), in_shares=(0.4,)),
        BudgetUnit("e3", 6, ("e3",), ("next",), in_shares=(0.6,)),
        BudgetUnit("n", 5, ("next",), ("head",)),
    ]
    flops = {m: int(rng.integers(50, 500)) for m in ("stem", "sq", "e1", "e3", "next", "head")}
    total = sum(flops.values()) + 10
    curves = {}
    for u in units:
        counts = count_grid(u.width).numpy()
        curves[u.name] = (counts.tolist(), (rng.uniform(0.2, 3) * (1 - counts / u.width)).tolist())
    alloc = allocate(units, curves, speedup=1.7, module_flops=flops, total_flops=total)
    assert alloc.solver == "tree dp"
    assert alloc.flops == pytest.approx(predict_flops(units, alloc.channels, flops, total))
    assert_matches_brute_force(alloc, units, curves, flops, total, 1.7)


# --------------------------------------------------------------------------- models


def test_torchvision_squeezenet_prunes_every_expand_with_the_refit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(num_classes=10).eval()
    x = torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    graph = find_units(net)
    assert {u.name for u in graph.units if u.cat_lead is not None} == {
        f"features.{i}.expand{k}" for i in (3, 4, 6, 7, 9, 10, 11, 12) for k in ("1x1", "3x3")
    }
    kw = {"speedup": 2.0, "method": "lasso", "allocation": "uniform"}
    fitted = quiet_prune(net, x, **kw)
    none = quiet_prune(net, x, reconstruct="none", **kw)
    assert fitted.report.speedup == pytest.approx(2.0, rel=0.02)
    assert fitted.report.output_error < none.report.output_error


def _rank_concat(rank: int, world: int) -> dict:
    res = quiet_prune(_net(), X.split(6), speedup=1.6)
    return {"kept": res.kept, "out": res.model(X).detach()}


@pytest.mark.slow  # 15 s of process start-up
def test_two_ranks_give_the_one_process_concatenated_model():
    ranks = values(run_ranks(_rank_concat, timeout=240))
    single = quiet_prune(_net(), X.split(8), speedup=1.6)
    assert ranks[0]["kept"] == ranks[1]["kept"] == single.kept
    assert torch.equal(ranks[0]["out"], ranks[1]["out"])
    assert_same_outputs(ranks[0]["out"], single.model(X).detach())
