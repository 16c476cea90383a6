"""scripts/peers.py: the FLOPs-matching bisection (no Torch-Pruning needed), Torch-Pruning's
counter with recon's layers registered, and the whole script in --quick mode."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from recon.layers import SampledConv2d
from recon.models import pretrained_names

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("_script_peers", SCRIPTS / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target", [1.5, 2.0, 4.0])
def test_match_ratio_finds_the_uniform_ratio(peers, target):
    """Uniform channel pruning at ratio r keeps (1 - r)^2 of a conv stack's FLOPs."""
    calls = []

    def speedup_at(r):
        calls.append(r)
        return 1 / (1 - r) ** 2

    r, s = peers.match_ratio(speedup_at, target, tol=0.001)
    assert abs(s / target - 1) <= 0.001
    assert r == pytest.approx(1 - target**-0.5, abs=1e-3)
    assert s == speedup_at(r) and len(calls) <= 30


def test_match_ratio_returns_the_closest_step(peers):
    """Whole channels: 4 channels step over a 2 % band round 2x; the closest is kept."""

    def speedup_at(r):
        kept = max(1, round(4 * (1 - r)))
        return (4 / kept) ** 2  # 1, 1.78, 4, 16

    r, s = peers.match_ratio(speedup_at, 2.0, tol=0.02)
    assert s == pytest.approx(16 / 9)
    assert round(4 * (1 - r)) == 3


def test_match_ratio_bad_target(peers):
    with pytest.raises(ValueError, match="'target' parameter must be a float >= 1"):
        peers.match_ratio(lambda r: 1.0, 0.5)


def test_tp_counter_counts_sampled_convs(peers):
    """Torch-Pruning's counter skips a SampledConv2d unless it is registered."""
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        SampledConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1), [0, 2]),
    )
    first, second = (1 * 4 * 9 + 4) * 32 * 32, (2 * 8 * 9 + 8) * 32 * 32  # MACs + bias
    assert peers.tp_macs(net) == first + second
    unregistered, _ = tp.utils.count_ops_and_params(net, torch.zeros(1, 1, 32, 32))
    assert unregistered == first
    assert peers.flops(net) == 2 * (1 * 4 * 9 + 2 * 8 * 9) * 32 * 32  # FlopCounterMode


@pytest.mark.skipif("vgg16_fmnist" not in pretrained_names(), reason="not shipped")
def test_peers_quick(peers, tmp_path):
    """--quick: VGG-16 at 2x, both tools, every criterion and scope, 2 fine-tuning steps."""
    pytest.importorskip("torch_pruning")
    from recon.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    before = torch.get_num_threads()
    try:
        peers.main(["--quick", "--criteria", "l2,taylor", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(x) for x in (tmp_path / "peers.jsonl").read_text().splitlines()]
    pruned = [r for r in rows if r["stage"] == "prune"]
    assert [(r["tool"], r["criterion"], r["scope"]) for r in pruned] == [
        ("recon", "obs", "auto"),
        ("torch-pruning", "l2", "uniform"), ("torch-pruning", "taylor", "uniform"),
        ("torch-pruning", "l2", "global"), ("torch-pruning", "taylor", "global"),
    ]  # fmt: skip
    for r in pruned:
        assert "error" not in r
        assert abs(r["flops_speedup"] / 2 - 1) < 0.1  # whole channels at 2 %, or closest
        assert r["flops"] == pytest.approx(r["base_flops"] / r["flops_speedup"])
        assert 0 <= r["oneshot"] <= 1 and 0 <= r["bn"] <= 1 and r["test"] == 200
        assert math.isfinite(r["tp_speedup"]) and r["tp_speedup"] > 1
    uniform = [r["ratio"] for r in pruned if r["scope"] == "uniform"]
    assert uniform[0] == uniform[1]  # the same channel counts whatever the criterion
    tuned = [r for r in rows if r["stage"] == "finetune"]
    best = max(pruned[1:], key=lambda r: r["bn"])
    assert [(r["tool"], r["criterion"], r["scope"], r["steps"]) for r in tuned] == [
        ("recon", "obs", "auto", 2), ("torch-pruning", best["criterion"], best["scope"], 2),
    ]  # fmt: skip
    for r, p in zip(tuned, (pruned[0], best), strict=True):
        assert r["start"] == p["bn"]  # the fine-tuned model is the row's, re-pruned
    md = (tmp_path / "peers.md").read_text(encoding="utf-8")
    assert md.startswith("# recon and Torch-Pruning\n")
    assert "`nice -n 10 python scripts/peers.py --quick --criteria l2,taylor --out-dir" in md
    assert "| vgg16_fmnist | 2× | TP taylor, global |" in md
    assert "Taylor needs labels" in md
    (tmp_path / "peers.md").unlink()
    peers.main(["--page-only", "--quick", "--criteria", "l2,taylor", "--out-dir", str(tmp_path)])
    assert (tmp_path / "peers.md").read_text(encoding="utf-8") == md  # from the JSONL alone


def test_reestimate_bn_averages_then_restores_momentum(peers):
    # known answer: the running mean is the plain mean of the batch means; the
    # momentum is set back, so a later training step moves it by momentum, not 1/(n+1)
    from _measure import reestimate_bn

    net = nn.Sequential(nn.BatchNorm2d(3, momentum=0.25))
    batches = [torch.randn(8, 3, 4, 4) + k for k in range(4)]
    reestimate_bn(net, batches)
    want = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(net[0].running_mean, want)
    assert net[0].momentum == 0.25 and not net.training
    before = net[0].running_mean.clone()
    x = torch.randn(8, 3, 4, 4) + 10
    net.train()(x)
    after = 0.75 * before + 0.25 * x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(net[0].running_mean, after)
