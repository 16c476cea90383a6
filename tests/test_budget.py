"""Tests of recon.budget: FLOPs/params counting and target -> channels per unit."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from recon.budget import (
    BudgetUnit,
    achieved_speedup,
    count_flops,
    count_params,
    predict_flops,
    resolve_channels,
)

# ------------------------------------------------------------------------- builders

WIDTHS = (64, 128, 256, 512, 512)


def vgg_chain() -> nn.Sequential:
    """Five 3x3 convs (widths 64..512) with 2x2 pools at 32px, then a linear head."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = 3
    for i, width in enumerate(WIDTHS, start=1):
        layers[f"c{i}"] = nn.Conv2d(c_in, width, 3, padding=1)
        layers[f"bn{i}"] = nn.BatchNorm2d(width)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        c_in = width
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(512, 10)
    return nn.Sequential(layers)


def chain_units() -> list[BudgetUnit]:
    names = [f"c{i}" for i in range(1, 6)]
    consumers = [*names[1:], "fc"]
    return [
        BudgetUnit(name, width, out_modules=(name,), in_modules=(consumer,))
        for name, width, consumer in zip(names, WIDTHS, consumers, strict=True)
    ]


@pytest.fixture(scope="module")
def chain_flops() -> tuple[int, dict[str, int]]:
    return count_flops(vgg_chain(), torch.zeros(1, 3, 32, 32))


def two_units() -> list[BudgetUnit]:
    # c1 -> c2 -> fc: c2 consumes unit "a" and produces unit "b".
    return [
        BudgetUnit("a", 4, out_modules=("c1",), in_modules=("c2",)),
        BudgetUnit("b", 8, out_modules=("c2",), in_modules=("fc",)),
    ]


TWO_FLOPS = {"c1": 100, "c2": 800, "fc": 100, "other": 50}
TWO_TOTAL = 1050


# ------------------------------------------------------------------------- counting


def test_count_flops_equals_two_macs_per_module():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )
    total, per_module = count_flops(net, torch.randn(5, 3, 8, 8))  # batch 5 -> counts for 1
    conv0 = 2 * (8 * 8 * 8) * (3 * 9)  # 2 * output elements * MACs per element
    conv2 = 2 * (4 * 4 * 4) * (8 * 9)
    fc = 2 * 64 * 10
    assert per_module == {"0": conv0, "1": 0, "2": conv2, "3": 0, "4": fc}
    assert total == conv0 + conv2 + fc


def test_count_flops_nested_names_and_restores_modes():
    net = nn.Sequential(OrderedDict(block=nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))))
    net.train()
    net.block[1].eval()  # a mixed state must survive
    total, per_module = count_flops(net, torch.randn(2, 2, 4, 4))
    assert per_module == {"block.0": 2 * 3 * 16 * 2, "block.1": 0}
    assert total == 2 * 3 * 16 * 2
    assert net.training and net.block.training and net.block[0].training
    assert not net.block[1].training


def test_count_flops_bad_arguments():
    with pytest.raises(TypeError, match="'model'"):
        count_flops("not a model", torch.zeros(1))
    with pytest.raises(TypeError, match="'example_input'"):
        count_flops(nn.Linear(2, 2), [[0.0, 1.0]])


def test_count_params():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2, bias=False))
    assert count_params(net) == (8 * 3 * 9 + 8) + (8 + 8) + 16
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, shared)) == 20
    with pytest.raises(TypeError, match="'model'"):
        count_params(3)


def test_chain_flops_hand_computed(chain_flops):
    total, per_module = chain_flops
    expected = {
        "c1": 2 * 64 * 32 * 32 * 3 * 9,
        "c2": 2 * 128 * 16 * 16 * 64 * 9,
        "c3": 2 * 256 * 8 * 8 * 128 * 9,
        "c4": 2 * 512 * 4 * 4 * 256 * 9,
        "c5": 2 * 512 * 2 * 2 * 512 * 9,
        "fc": 2 * 512 * 10,
    }
    assert {k: v for k, v in per_module.items() if v} == expected
    assert total == sum(expected.values())


# ----------------------------------------------------------------------- prediction


def test_predict_flops_known_numbers():
    units = two_units()
    # a keeps 2/4, b keeps 2/8: c1 * 1/2, c2 * 1/2 * 1/4 (inner conv), fc * 1/4.
    expected = 50 + 100 * 0.5 + 800 * 0.5 * 0.25 + 100 * 0.25
    assert predict_flops(units, {"a": 2, "b": 2}, TWO_FLOPS, TWO_TOTAL) == pytest.approx(expected)
    assert predict_flops(units, {}, TWO_FLOPS, TWO_TOTAL) == TWO_TOTAL
    # only "b" listed: "a" keeps all
    expected_b = 50 + 100 + 800 * 0.5 + 100 * 0.5
    assert predict_flops(units, {"b": 4}, TWO_FLOPS, TWO_TOTAL) == pytest.approx(expected_b)
    assert achieved_speedup(units, {"b": 4}, TWO_FLOPS, TWO_TOTAL) == pytest.approx(
        TWO_TOTAL / expected_b
    )


def test_predict_flops_matches_counting_a_pruned_chain(chain_flops):
    total, per_module = chain_flops
    kept = dict(zip([u.name for u in chain_units()], (32, 64, 100, 256, 128), strict=True))
    pruned = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 100, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(100, 256, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(256, 128, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    actual, _ = count_flops(pruned, torch.zeros(1, 3, 32, 32))
    assert predict_flops(chain_units(), kept, per_module, total) == pytest.approx(actual)


def test_predict_flops_unknown_unit():
    with pytest.raises(ValueError, match=r"'channels'.*'zz'.*Valid unit names.*'a'"):
        predict_flops(two_units(), {"zz": 1}, TWO_FLOPS, TWO_TOTAL)


# ------------------------------------------------------------------------ resolving


def test_resolve_channels_explicit():
    units = two_units()
    assert resolve_channels(units, channels={"b": 3}) == {"a": 4, "b": 3}
    assert resolve_channels(units, channels={"a": 1, "b": 8}) == {"a": 1, "b": 8}
    # round_to does not apply to explicit counts
    assert resolve_channels(units, channels={"b": 3}, round_to=4) == {"a": 4, "b": 3}


def test_resolve_channels_keep_ratio():
    units = chain_units()
    assert resolve_channels(units, keep_ratio=0.5) == {
        "c1": 32,
        "c2": 64,
        "c3": 128,
        "c4": 256,
        "c5": 256,
    }
    assert resolve_channels(units, keep_ratio=1) == {u.name: u.width for u in units}
    # round(0.3 * 64) = 19 -> 24 with round_to=8; 0.3 * 128 = 38.4 -> 38 -> 40
    got = resolve_channels(units, keep_ratio=0.3, round_to=8, ignored_layers=["c5"])
    assert got == {"c1": 24, "c2": 40, "c3": 80, "c4": 160, "c5": 512}
    # a ratio keeping one channel of the narrowest layer, rounded up to round_to
    assert resolve_channels(units, keep_ratio=0.6 / 64)["c1"] == 1
    assert resolve_channels(units, keep_ratio=0.6 / 64, round_to=16)["c1"] == 16
    # a ratio that rounds to 0 channels of some layer is an error naming it
    with pytest.raises(ValueError, match=r"keep_ratio.*channels of layer 'c1'"):
        resolve_channels(units, keep_ratio=1e-6)
    with pytest.raises(ValueError, match=r"keep_ratio\['c2'\].*channels of layer 'c2'"):
        resolve_channels(units, keep_ratio={"c2": 1e-3})
    # round_to above the width caps at the width
    assert resolve_channels(two_units(), keep_ratio=0.5, round_to=16) == {"a": 4, "b": 8}


def test_resolve_channels_keep_ratio_dict():
    units = chain_units()
    got = resolve_channels(units, keep_ratio={"c2": 0.25, "c4": 0.5}, round_to=8)
    assert got == {"c1": 64, "c2": 32, "c3": 256, "c4": 256, "c5": 512}


def test_resolve_channels_ignored_single_string():
    got = resolve_channels(two_units(), keep_ratio=0.5, ignored_layers="a")
    assert got == {"a": 4, "b": 4}


@pytest.mark.parametrize("speedup", [1.5, 2.0, 3.0, 4.0, 6.0])
@pytest.mark.parametrize("round_to", [1, 8])
def test_resolve_channels_speedup_reaches_target(chain_flops, speedup, round_to):
    total, per_module = chain_flops
    units = chain_units()
    got = resolve_channels(
        units, speedup=speedup, round_to=round_to, module_flops=per_module, total_flops=total
    )
    assert list(got) == [u.name for u in units]
    achieved = achieved_speedup(units, got, per_module, total)
    assert achieved == pytest.approx(speedup, rel=0.02)
    for unit in units:
        assert 1 <= got[unit.name] <= unit.width
        assert got[unit.name] % round_to == 0 or got[unit.name] == unit.width


def test_resolve_channels_speedup_is_roughly_uniform(chain_flops):
    total, per_module = chain_flops
    units = chain_units()
    got = resolve_channels(units, speedup=4.0, module_flops=per_module, total_flops=total)
    ratios = [got[u.name] / u.width for u in units]
    assert max(ratios) - min(ratios) < 0.05  # ~1/2 everywhere, a few channels moved


def test_resolve_channels_speedup_with_ignored(chain_flops):
    total, per_module = chain_flops
    units = chain_units()
    got = resolve_channels(
        units,
        speedup=2.0,
        ignored_layers=["c1", "c5"],
        module_flops=per_module,
        total_flops=total,
    )
    assert got["c1"] == 64 and got["c5"] == 512
    assert achieved_speedup(units, got, per_module, total) == pytest.approx(2.0, rel=0.02)


def test_resolve_channels_speedup_one_keeps_all(chain_flops):
    total, per_module = chain_flops
    units = chain_units()
    got = resolve_channels(units, speedup=1, module_flops=per_module, total_flops=total)
    assert got == {u.name: u.width for u in units}


def test_resolve_channels_impossible_speedup(chain_flops):
    total, per_module = chain_flops
    units = chain_units()
    smallest = {u.name: 8 for u in units}
    maximum = achieved_speedup(units, smallest, per_module, total)
    with pytest.raises(ValueError, match=rf"'speedup'.*maximum.*{maximum:.4g}"):
        resolve_channels(
            units, speedup=maximum * 1.1, round_to=8, module_flops=per_module, total_flops=total
        )
    # exactly the maximum is reachable (within the 1 % tolerance)
    got = resolve_channels(
        units, speedup=maximum, round_to=8, module_flops=per_module, total_flops=total
    )
    assert achieved_speedup(units, got, per_module, total) == pytest.approx(maximum, rel=0.01)
    # nothing prunable: any speedup > 1 is impossible
    with pytest.raises(ValueError, match="maximum achievable speedup, 1 "):
        resolve_channels(
            units,
            speedup=1.5,
            ignored_layers=[u.name for u in units],
            module_flops=per_module,
            total_flops=total,
        )


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"Exactly one of .*'speedup'.*'keep_ratio'.*'channels'.*Got none"),
        (
            {"speedup": 2.0, "keep_ratio": 0.5},
            r"Exactly one of .*Got 'speedup' and 'keep_ratio'",
        ),
        ({"keep_ratio": 0.5, "channels": {"a": 1}}, "Got 'keep_ratio' and 'channels'"),
    ],
)
def test_resolve_channels_exactly_one_target(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_channels(two_units(), **kwargs)


FLOPS_KW = {"module_flops": TWO_FLOPS, "total_flops": TWO_TOTAL}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"speedup": 0.5, **FLOPS_KW}, ValueError, r"'speedup' argument must be a float >= 1\. "),
        ({"speedup": math.nan, **FLOPS_KW}, ValueError, "'speedup'"),
        ({"speedup": math.inf, **FLOPS_KW}, ValueError, "'speedup'.*finite"),
        ({"speedup": True, **FLOPS_KW}, TypeError, "'speedup'"),
        ({"speedup": "2", **FLOPS_KW}, TypeError, "'speedup'"),
        ({"speedup": 2.0}, ValueError, "'module_flops' and 'total_flops'"),
        ({"speedup": 2.0, "module_flops": TWO_FLOPS}, ValueError, "no 'total_flops'"),
        ({"speedup": 2.0, "module_flops": TWO_FLOPS, "total_flops": 0}, ValueError, "total_flop"),
        ({"speedup": 2.0, "module_flops": [1], "total_flops": 10}, TypeError, "'module_flops'"),
        ({"keep_ratio": 0}, ValueError, r"'keep_ratio' argument must be a float in \(0, 1\]"),
        ({"keep_ratio": 0.0}, ValueError, "'keep_ratio'"),
        ({"keep_ratio": 1.5}, ValueError, "'keep_ratio'.*Got 1.5 instead"),
        ({"keep_ratio": -0.1}, ValueError, "'keep_ratio'"),
        ({"keep_ratio": math.nan}, ValueError, "'keep_ratio'"),
        ({"keep_ratio": True}, TypeError, "'keep_ratio'"),
        ({"keep_ratio": "half"}, TypeError, "'keep_ratio'"),
        ({"keep_ratio": {"a": 0}}, ValueError, r"'keep_ratio\['a'\]'"),
        ({"keep_ratio": {"a": None}}, TypeError, r"'keep_ratio\['a'\]'"),
        ({"keep_ratio": {"zz": 0.5}}, ValueError, r"'keep_ratio'.*'zz'.*Valid unit names"),
        ({"channels": {"a": 0}}, ValueError, r"'channels\['a'\]' argument must be an int in"),
        ({"channels": {"a": 5}}, ValueError, r"'channels\['a'\]'.*\[1, 4\].*Got 5"),
        ({"channels": {"a": 2.0}}, TypeError, r"'channels\['a'\]'"),
        ({"channels": {"a": True}}, TypeError, r"'channels\['a'\]'"),
        ({"channels": {"zz": 1, "yy": 2}}, ValueError, r"'channels'.*'zz', 'yy'.*'a', 'b'"),
        ({"channels": [("a", 1)]}, TypeError, "'channels'"),
        ({"channels": {"a": 1}, "ignored_layers": ["a"]}, ValueError, "'ignored_layers' also"),
        ({"keep_ratio": 0.5, "ignored_layers": ["zz"]}, ValueError, "'ignored_layers'.*'zz'"),
        ({"keep_ratio": 0.5, "ignored_layers": 3}, TypeError, "'ignored_layers'"),
        ({"keep_ratio": 0.5, "round_to": 0}, ValueError, "'round_to' argument must be an int >= 1"),
        ({"keep_ratio": 0.5, "round_to": 2.0}, TypeError, "'round_to'"),
        ({"keep_ratio": 0.5, "round_to": True}, TypeError, "'round_to'"),
    ],
)
def test_resolve_channels_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        resolve_channels(two_units(), **kwargs)


def test_unknown_names_abbreviated():
    units = [BudgetUnit(f"u{i}", 4, (f"m{i}",), ()) for i in range(30)]
    with pytest.raises(ValueError, match=r"'u7', \.\.\. \(22 more\)\]") as info:
        resolve_channels(units, keep_ratio=0.5, ignored_layers=["nope"])
    assert "'u20'" not in str(info.value)


def test_bad_units():
    with pytest.raises(TypeError, match="'units'"):
        resolve_channels(two_units()[0], keep_ratio=0.5)
    with pytest.raises(TypeError, match="'units'"):
        resolve_channels(["a"], keep_ratio=0.5)
    with pytest.raises(ValueError, match="unique names"):
        resolve_channels(two_units() * 2, keep_ratio=0.5)
    with pytest.raises(ValueError, match="width of unit 'a'"):
        resolve_channels([BudgetUnit("a", 0, (), ())], keep_ratio=0.5)


# ----------------------------------------------------------------------- properties


@st.composite
def random_problem(draw):
    n = draw(st.integers(1, 6))
    widths = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    units = [
        BudgetUnit(f"u{i}", w, out_modules=(f"m{i}",), in_modules=(f"m{i + 1}",))
        for i, w in enumerate(widths)
    ]
    flops = {f"m{i}": draw(st.integers(0, 10**6)) for i in range(n + 1)}
    total = sum(flops.values()) + draw(st.integers(1, 10**5))
    return units, flops, total


@settings(max_examples=100, deadline=None)
@given(
    problem=random_problem(),
    ratio=st.floats(1e-4, 1.0, exclude_min=False),
    round_to=st.integers(1, 32),
)
def test_keep_ratio_counts_in_range_and_rounded(problem, ratio, round_to):
    units, _, _ = problem
    if any(u.width > 1 and ratio * u.width < 0.5 for u in units):  # 0 channels: refused
        with pytest.raises(ValueError, match="must keep at least one"):
            resolve_channels(units, keep_ratio=ratio, round_to=round_to)
        return
    got = resolve_channels(units, keep_ratio=ratio, round_to=round_to)
    for unit in units:
        count = got[unit.name]
        assert 1 <= count <= unit.width
        assert count % round_to == 0 or count == unit.width
        assert count >= min(unit.width, round(ratio * unit.width))


@settings(max_examples=60, deadline=None)
@given(
    problem=random_problem(),
    fraction=st.floats(0.0, 1.0),
    round_to=st.integers(1, 16),
)
def test_speedup_counts_in_range_and_rounded(problem, fraction, round_to):
    units, flops, total = problem
    smallest = {u.name: min(round_to, u.width) for u in units}
    maximum = achieved_speedup(units, smallest, flops, total)
    speedup = 1.0 + fraction * (maximum - 1.0)
    got = resolve_channels(
        units, speedup=speedup, round_to=round_to, module_flops=flops, total_flops=total
    )
    for unit in units:
        count = got[unit.name]
        assert 1 <= count <= unit.width
        assert count % round_to == 0 or count == unit.width
