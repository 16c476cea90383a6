"""One pruned pass per unit (recon.passes): the cache past each unit's producer.

With ``Passes(single_pass=True)`` (the default), the pruned network's values at a
unit's consumer are cached at full width and sliced to the kept channels once the unit
is pruned, so no layer runs twice. The older scheme (the cut before the producer) is
kept as ``recon.passes._SINGLE_PASS = False``; both must give the same model: the same
channels, and outputs and weights equal to the tolerances of ``_compare``.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from _compare import assert_same_outputs, assert_same_state
from nets import randomize_bn
from test_depthwise import TinyMobileNet
from torch import fx, nn

import recon
import recon.passes
from recon import models
from recon.graph import find_units, trace
from recon.passes import Passes

X = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(7))
HELD_OUT = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(8))


def _vgg() -> nn.Module:
    return models.VGG([8, 8, "M", 16, 16, "M", 24, "M"], input_size=16)


class _EarlyProducer(nn.Module):
    """Two branches, written so that the second branch's producer runs before the first
    branch's consumer: the first unit's cut cannot move past its producer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_c = nn.Conv2d(8, 6, 3, padding=1)
        self.conv_d = nn.Conv2d(8, 6, 3, padding=1)
        self.fa = nn.Linear(6, 4)
        self.fb = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        a, b = self.conv_a(x), self.conv_b(x)
        c, d = self.conv_c(torch.relu(a)), self.conv_d(torch.relu(b))
        pool = nn.functional.adaptive_avg_pool2d
        return self.fa(torch.flatten(pool(c, 1), 1)) + self.fb(torch.flatten(pool(d, 1), 1))


CASES = {
    "vgg": (_vgg, {"speedup": 2.0, "allocation": "uniform"}),
    "vgg-auto": (_vgg, {"speedup": 2.0}),
    "resnet20": (
        lambda: models.cifar_resnet20(width=0.5),
        {"speedup": 2.0, "allocation": "uniform", "method": "thinet"},
    ),
    "mobilenet": (TinyMobileNet, {"keep_ratio": 0.5}),
    "early-producer": (_EarlyProducer, {"keep_ratio": 0.5}),
}


def _prune(net: nn.Module, single: bool, monkeypatch, **kwargs) -> recon.PruneResult:
    monkeypatch.setattr(recon.passes, "_SINGLE_PASS", single)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="re-fitting", category=UserWarning)
        return recon.prune(net, X.split(8), progress=False, **kwargs)


def _net(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(CASES[name][0]()).eval()


def _assert_close(a: recon.PruneResult, b: recon.PruneResult) -> None:
    assert a.kept == b.kept  # a flipped near-tie would show here
    assert_same_state(a.model.state_dict(), b.model.state_dict())
    with torch.no_grad():
        assert_same_outputs(a.model(HELD_OUT), b.model(HELD_OUT))


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0, 40_000])
@pytest.mark.parametrize("name", list(CASES))
def test_single_pass_gives_the_old_paths_model(monkeypatch, name, cache_bytes):
    net, kwargs = _net(name), CASES[name][1]
    new = _prune(net, True, monkeypatch, cache_bytes=cache_bytes, **kwargs)
    old = _prune(net, False, monkeypatch, cache_bytes=cache_bytes, **kwargs)
    _assert_close(new, old)
    assert new.report.layers[0].error_after == pytest.approx(old.report.layers[0].error_after)


@pytest.mark.parametrize("name", ["vgg", "resnet20"])
def test_single_pass_reruns_are_bit_identical(monkeypatch, name):
    net, kwargs = _net(name), CASES[name][1]
    a = _prune(net, True, monkeypatch, **kwargs)
    b = _prune(net, True, monkeypatch, **kwargs)
    assert a.kept == b.kept
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


@pytest.fixture
def images_per_node(monkeypatch):
    """Images each ``call_module`` node processes, per fx interpreter (one per network)."""
    counts: collections.Counter = collections.Counter()
    run_node = fx.Interpreter.run_node

    def counting(self, node):
        out = run_node(self, node)
        if node.op == "call_module" and isinstance(out, torch.Tensor):
            counts[(id(self), node.name)] += out.shape[0]
        return out

    monkeypatch.setattr(fx.Interpreter, "run_node", counting)
    return counts


@pytest.mark.parametrize("name", ["vgg", "vgg-auto", "resnet20", "mobilenet"])
def test_no_layer_runs_twice(monkeypatch, images_per_node, name):
    """With the cache, each network (original, pruned, the profile's) runs every layer
    once per calibration image; the old path runs each producer twice."""
    net, kwargs = _net(name), CASES[name][1]
    _prune(net, True, monkeypatch, **kwargs)
    new = collections.Counter(images_per_node.values())
    images_per_node.clear()
    _prune(net, False, monkeypatch, **kwargs)
    old = collections.Counter(images_per_node.values())
    fit = 20 if name == "vgg-auto" else None  # the profile holds 4 of 24 images out
    assert set(new) <= {len(X), fit}
    assert max(old) >= 2 * fit if fit else max(old) == 2 * len(X)


def test_cuts_fall_back_before_the_producer_where_unsafe():
    """A later unit's producer runs before this unit's consumer: the old cut there."""
    net = _net("early-producer")
    graph = find_units(net)
    gm = trace(net)
    names = [u.name for u in graph.units]
    assert names == ["stem", "conv_a", "conv_b", "conv_c", "conv_d"]  # stem: two readers
    passes = Passes(
        gm, trace(net), list(X.split(8)), graph.units, {}, [],
        samples_per_image=4, seed=0, cache_bytes=1 << 30, final=False,
    )  # fmt: skip
    sliced = [s is not None for s in passes._slices]
    assert sliced == [False, False, False, False, True]  # stem: readers; fa after conv_d
    old = Passes(
        gm, trace(net), list(X.split(8)), graph.units, {}, [],
        samples_per_image=4, seed=0, cache_bytes=1 << 30, final=False, single_pass=False,
    )  # fmt: skip
    assert old._slices == [None] * 5 and passes.cuts[:2] == old.cuts[:2]


def test_the_next_step_needs_the_kept_channels():
    net = _net("vgg")
    graph = find_units(net)
    gm = trace(net)
    passes = Passes(
        gm, gm, list(X.split(8)), graph.units, {}, [],
        samples_per_image=4, seed=0, cache_bytes=1 << 30, final=False,
    )  # fmt: skip
    with torch.no_grad():
        for b in range(3):
            passes.pruned(0, b, [])
        with pytest.raises(RuntimeError, match="kept"):
            passes.pruned(1, 0, [])
        passes.kept(0, None)
        passes.pruned(1, 0, [])
