"""Concatenations and values read by several convs (SqueezeNet, GoogLeNet, DenseNet): a
producer owns a slice of each reader's input; only the slices are cut and re-fitted, the
channels chosen for all readers together."""

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
    found = {u.name: (u.consumer, u.cat_lead, [r.consumer for r in u.readers]) for u in graph.units}
    assert found == {
        "stem": ("sq1", None, []),
        "sq1": ("e1a", None, ["e3a"]),  # both expands read the squeeze
        "e1a": ("sq2", (), []),
        "e3a": ("sq2", ("e1a",), []),
        "sq2": ("e1b", None, ["e3b"]),
        "e1b": ("head", (), []),
        "e3b": ("head", ("e1b",), []),
    }
    assert graph.unit("sq1").readers[0].name == "sq1>e3a"
    assert graph.unit("sq2").channelwise == ("bn2",)
    assert graph.unit("e1b").consumer_bn is None and graph.unit("e1a").consumer_bn == "bn2"


class _Cat(nn.Module):
    """Two convs concatenated, then ``tail``."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = tail
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn, self.c, self.d = nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)
        self.fc, self.flat = nn.Linear(8, 2), nn.Linear(8 * 12 * 12, 2)

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
        if self.tail == "flat":
            return self.flat(y.flatten(1))
        if self.tail == "added":
            return self.c(y * x.mean())
        return self.c(y)


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        ("dim0", "not along channels"),
        ("twice", "the same value twice"),
        ("flat", "no global pooling"),
        ("added", "combines it with other values"),
    ],
)
def test_concatenations_recon_cannot_cut_along_say_why(tail, why):
    graph = find_units(_Cat(tail))
    assert "b" not in graph.names
    assert re.search(why, graph.skipped["b"])


def test_a_batchnorm_after_a_concatenation_and_several_readers_are_cut_along():
    graph = find_units(_Cat("bn"))
    assert (graph.unit("b").cat_after, graph.unit("b").cat_lead) == (("bn",), ("a",))
    graph = find_units(_Cat("linear"))
    assert [(u.consumer, u.consumer_kind, u.taps, u.cat_lead) for u in graph.units] == [
        ("fc", "linear", 1, ()),
        ("fc", "linear", 1, ("a",)),
    ]
    graph = find_units(_Cat("two readers"))
    assert [(r.consumer, r.cat_lead) for r in (graph.unit("b"), *graph.unit("b").readers)] == [
        ("c", ("a",)),
        ("d", ("a",)),
    ]


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


def test_a_squeeze_read_by_both_expands_is_refitted_in_each():
    # sq1's channels come in duplicated pairs: half of them carry everything, and both
    # readers (e1a, e3a) re-fitted on them lose nothing.
    net = _net()
    with torch.no_grad():
        net.sq1.weight[1::2] = net.sq1.weight[0::2]
        net.sq1.bias[1::2] = net.sq1.bias[0::2]
    res = quiet_prune(net, X, channels={"sq1": 3}, method="obs")
    layer = next(r for r in res.report.layers if r.name == "sq1")
    assert layer.error_after < 1e-6 < layer.error_before
    assert "2 readers" in layer.note
    assert (res.model.e1a.in_channels, res.model.e3a.in_channels) == (3, 3)
    torch.testing.assert_close(res.model(X), net(X), atol=1e-3, rtol=1e-3)
    plain = quiet_prune(net, X, channels={"sq1": 3}, method="obs", reconstruct="none")
    assert rel_error(plain.model(X), net(X)) > 100 * rel_error(res.model(X), net(X))


class TinyDense(nn.Module):
    """A dense block (DenseNet): every layer reads the concatenation of all the features
    before it through its own BatchNorm, then a transition and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.n1, self.c1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.n2, self.c2 = nn.BatchNorm2d(12), nn.Conv2d(12, 4, 3, padding=1, bias=False)
        self.n3, self.c3 = nn.BatchNorm2d(16), nn.Conv2d(16, 6, 1, bias=False)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f0 = self.conv0(x)
        f1 = self.c1(F.relu(self.n1(torch.cat([f0], 1))))
        f2 = self.c2(F.relu(self.n2(torch.cat([f0, f1], 1))))
        y = self.c3(F.relu(self.n3(torch.cat([f0, f1, f2], 1))))
        y = F.relu(self.head(F.avg_pool2d(y, 2)))
        return F.adaptive_avg_pool2d(y, 1).flatten(1)


def _dense() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyDense()).eval()


def test_dense_features_are_units_of_every_later_layer():
    graph = find_units(_dense())
    readers = {
        u.name: [(r.consumer, r.cat_lead, r.cat_after) for r in (u, *u.readers)]
        for u in graph.units
    }
    assert readers == {
        "conv0": [("c1", (), ("n1",)), ("c2", (), ("n2",)), ("c3", (), ("n3",))],
        "c1": [("c2", ("conv0",), ("n2",)), ("c3", ("conv0",), ("n3",))],
        "c2": [("c3", ("conv0", "c1"), ("n3",))],
        "c3": [("head", None, ())],
    }


def test_a_dense_block_prunes_with_the_refit():
    net = _dense()
    torch.testing.assert_close(quiet_prune(net, X, keep_ratio=1.0).model(X), net(X))
    res = quiet_prune(net, X, channels={"conv0": 4, "c1": 2, "c2": 2}, method="lasso")
    m = res.model
    assert (m.c1.in_channels, m.n2.num_features, m.c2.in_channels) == (4, 6, 6)
    assert (m.n3.num_features, m.c3.in_channels) == (8, 8)
    none = quiet_prune(
        net, X, channels={"conv0": 4, "c1": 2, "c2": 2}, method="lasso", reconstruct="none"
    )
    assert res.report.output_error < none.report.output_error
    fast = quiet_prune(net, X, speedup=1.5, method="lasso")
    assert fast.report.speedup == pytest.approx(1.5, rel=0.02)
    fresh = recon.apply_plan(_dense(), res.plan)
    fresh.load_state_dict(res.model.state_dict())
    torch.testing.assert_close(fresh(X), res.model(X))


def test_duplicated_dense_features_lose_nothing_in_any_reader():
    net = _dense()
    with torch.no_grad():  # c1's features in pairs, each pair's copies normalised alike
        net.c1.weight[1::2] = net.c1.weight[0::2]
        for bn in (net.n2, net.n3):
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(bn, name)
                t[9:12:2] = t[8:12:2]
    res = quiet_prune(net, X, channels={"c1": 2}, method="obs")
    layer = next(r for r in res.report.layers if r.name == "c1")
    assert layer.error_after < 1e-6 < layer.error_before
    torch.testing.assert_close(res.model(X), net(X), atol=1e-3, rtol=1e-3)


class TinyInception(nn.Module):
    """Two branches concatenated, max-pooled, read by both branches of the next module,
    whose outputs are concatenated, pooled and read by a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 3, padding=1)
        self.b1, self.b3 = nn.Conv2d(10, 4, 1), nn.Conv2d(10, 4, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.max_pool2d(torch.cat([F.relu(self.a1(x)), F.relu(self.a3(x))], 1), 3, 1, 1)
        x = torch.cat([F.relu(self.b1(x)), F.relu(self.b3(x))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_an_inception_output_is_cut_in_every_branch_that_reads_it():
    torch.manual_seed(0)
    net = TinyInception().eval()
    graph = find_units(net)
    a3 = graph.unit("a3")
    assert [(r.consumer, r.cat_lead) for r in (a3, *a3.readers)] == [
        ("b1", ("a1",)),
        ("b3", ("a1",)),
    ]
    torch.testing.assert_close(quiet_prune(net, X, keep_ratio=1.0).model(X), net(X))
    kw = {"speedup": 1.5, "method": "lasso", "allocation": "uniform"}
    fitted, none = quiet_prune(net, X, **kw), quiet_prune(net, X, reconstruct="none", **kw)
    assert fitted.report.speedup == pytest.approx(1.5, rel=0.02)
    assert fitted.report.output_error < none.report.output_error
    assert fitted.model.b1.in_channels == fitted.model.b3.in_channels < 10
    b = graph.unit("b3")
    assert (b.consumer, b.consumer_kind, b.cat_lead) == ("fc", "linear", ("b1",))
    assert (
        fitted.model.fc.in_features == fitted.model.b1.out_channels + fitted.model.b3.out_channels
    )
    fresh = recon.apply_plan(TinyInception().eval(), fitted.plan)
    fresh.load_state_dict(fitted.model.state_dict())
    torch.testing.assert_close(fresh(X), fitted.model(X))


class TinyNested(nn.Module):
    """Inception-v3's InceptionE: a concatenation inside a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.r = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 1)
        self.b1, self.b2 = (
            nn.Conv2d(6, 4, (1, 3), padding=(0, 1)),
            nn.Conv2d(6, 4, (3, 1), padding=(1, 0)),
        )
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        r = F.relu(self.r(x))
        y = torch.cat([F.relu(self.a(x)), torch.cat([self.b1(r), self.b2(r)], 1)], 1)
        return F.adaptive_avg_pool2d(F.relu(self.head(y)), 1).flatten(1)


def test_nested_concatenations_add_up_their_offsets():
    torch.manual_seed(0)
    net = TinyNested().eval()
    graph = find_units(net)
    leads = {u.name: (u.consumer, u.cat_lead) for u in graph.units}
    assert leads["b1"] == ("head", ("a",)) and leads["b2"] == ("head", ("a", "b1"))
    torch.testing.assert_close(quiet_prune(net, X, keep_ratio=1.0).model(X), net(X))
    kw = {"channels": {"a": 2, "b1": 2, "b2": 2}, "method": "lasso"}
    fitted, none = quiet_prune(net, X, **kw), quiet_prune(net, X, reconstruct="none", **kw)
    assert fitted.model.head.in_channels == 6
    assert fitted.report.output_error < none.report.output_error


def test_a_residual_fork_read_by_two_convs_is_left_to_the_sampler():
    pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck, ResNet

    graph = find_units(ResNet(Bottleneck, [1, 1, 1, 1]))
    assert "conv1" not in graph.names and "layer1.0.conv1.sampler" in graph.names
    assert "first conv of a residual branch" in graph.skipped["conv1"]


def test_a_plan_with_a_malformed_reader_is_refused():
    res = quiet_prune(_net(), X, keep_ratio=0.5)
    plan = res.plan
    del plan["units"]["sq1"]["readers"][0]["taps"]
    with pytest.raises(ValueError, match="other readers as dicts with keys"):
        recon.apply_plan(_net(), plan)


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


@pytest.mark.slow  # a minute: torchvision's DenseNet-121 and GoogLeNet at 64 px
@pytest.mark.parametrize("name", ["densenet121", "googlenet"])
def test_torchvision_dense_and_inception_nets_prune_with_the_refit(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    # GoogLeNet's own init gives logits that hardly depend on the input: PyTorch's
    kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    net = randomize_bn(getattr(torchvision.models, name)(num_classes=10, **kw)).eval()
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert sum(1 for u in find_units(net).units if u.readers) > 30
    prune = {"speedup": 2.0, "method": "lasso", "allocation": "uniform"}
    fitted = quiet_prune(net, x, **prune)
    none = quiet_prune(net, x, reconstruct="none", **prune)
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
