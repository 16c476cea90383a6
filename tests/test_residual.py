"""Residual networks: sampler layers, block-sum targets, torchvision and CIFAR ResNets."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from nets import randomize_bn
from nets import rel_error as _rel
from torch import nn

import recon
from recon import api
from recon._default import train
from recon.cli import main
from recon.data import evaluate, load_digits_split
from recon.graph import find_units, trace
from recon.layers import SampledConv2d
from recon.models import BasicBlock, cifar_resnet20, digits_resnet20

torchvision = pytest.importorskip("torchvision")


def _block_outputs(model: nn.Module, x: torch.Tensor, kinds: tuple[type, ...]) -> list:
    """Outputs of every residual block module (in forward order) for input ``x``."""
    outs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: outs.append(o.detach()))
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


_TV_BLOCKS = (
    torchvision.models.resnet.BasicBlock,
    torchvision.models.resnet.Bottleneck,
)


# --------------------------------------------------------------------------- trained net


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A CIFAR-style ResNet-20 trained on scikit-learn's digits (about 5 s)."""
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    model = digits_resnet20()
    train(model, x_train, y_train, epochs=12, lr=0.1, batch_size=64, seed=0, progress=False)
    return model.eval()


@pytest.mark.parametrize("method", ["lasso", "thinet"])
def test_trained_resnet20_keeps_accuracy_at_2x(trained, digits, method):
    x_train, _, x_test, y_test = digits
    base = evaluate(trained, x_test, y_test)
    assert base > 0.95  # the fixture trained
    result = recon.prune(
        trained, x_train[:500].split(100), method=method, speedup=2.0, progress=False
    )
    assert result.report.speedup == pytest.approx(2.0, rel=0.02)
    acc = evaluate(result.model, x_test, y_test)
    assert acc >= base - 0.02, (base, acc)
    # without re-fitting the same selection loses far more
    plain = recon.prune(
        trained,
        x_train[:500].split(100),
        method=method,
        reconstruct="none",
        speedup=2.0,
        progress=False,
    )
    assert evaluate(plain.model, x_test, y_test) < acc


@pytest.mark.parametrize("samplers", [True, False])
def test_block_target_lowers_block_output_error(trained, digits, samplers):
    """Re-fitting a branch's last conv against the block's sum beats the branch alone."""
    x_train, _, x_test, _ = digits
    ref = _block_outputs(trained, x_test, (BasicBlock,))
    errors = {}
    for block_target in (True, False):
        result = recon.prune(
            trained,
            x_train[:500].split(100),
            speedup=2.0,
            sampler_layers=samplers,
            block_target=block_target,
            progress=False,
        )
        outs = _block_outputs(result.model, x_test, (BasicBlock,))
        errors[block_target] = [_rel(o, r) for o, r in zip(outs, ref, strict=True)]
        assert set(result.report.blocks) == {f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)}
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    assert mean[True] < mean[False], errors
    assert errors[True][-1] < errors[False][-1], errors  # the last block feeds the head


def test_sampler_layers_are_used_and_reported(trained, digits):
    x_train = digits[0]
    result = recon.prune(trained, x_train[:300].split(100), keep_ratio=0.5, progress=False)
    samplers = [r for r in result.report.layers if r.kind == "sampler"]
    assert [r.name for r in samplers] == [
        f"layer{i}.{j}.conv1.sampler" for i in (1, 2, 3) for j in range(3)
    ]
    for row in samplers:
        conv = result.model.get_submodule(row.name.removesuffix(".sampler"))
        assert isinstance(conv, SampledConv2d)
        assert conv.sampler.index.tolist() == result.kept[row.name]
        assert conv.in_channels == row.channels_after < conv.sampler.in_channels
    text = str(result.report)
    assert "sampler" in text and "worst block" in text
    # turning them off leaves every block's conv1 reading its whole input
    off = recon.prune(
        trained, x_train[:300].split(100), keep_ratio=0.5, sampler_layers=False, progress=False
    )
    assert not any(isinstance(m, SampledConv2d) for m in off.model.modules())
    assert not any(r.kind == "sampler" for r in off.report.layers)


def test_speedup_counts_sampler_savings(trained, digits):
    x_train = digits[0]
    calib = x_train[:200].split(100)
    on = recon.prune(trained, calib, speedup=2.0, method="first_k", progress=False)
    off = recon.prune(
        trained, calib, speedup=2.0, method="first_k", sampler_layers=False, progress=False
    )
    for result in (on, off):  # measured FLOPs of the pruned net, not the prediction
        assert result.report.speedup == pytest.approx(2.0, rel=0.02)
    # with samplers the same budget leaves the inner (conv1 output) channels wider
    inner = [n for n in on.channels if not n.endswith(".sampler")]
    assert sum(on.channels[n] for n in inner) > sum(off.channels[n] for n in inner)


# --------------------------------------------------------------------------- keeping all


def test_keeping_every_channel_reproduces_outputs():
    torch.manual_seed(0)
    net = randomize_bn(cifar_resnet20()).eval()
    x = torch.randn(8, 3, 16, 16)
    result = recon.prune(net, x, keep_ratio=1.0, progress=False)
    with torch.no_grad():
        assert torch.equal(result.model(x), net(x))


@pytest.mark.parametrize("block_target", [True, False])
def test_refit_keeping_every_channel_reproduces_outputs(block_target):
    """Every unit, samplers included, selected and re-fitted with all channels kept."""
    torch.manual_seed(0)
    net = randomize_bn(cifar_resnet20(width=0.5)).eval()
    x = torch.randn(64, 3, 8, 8)
    batches = list(x.split(32))
    graph = find_units(net)
    original, pruned = copy.deepcopy(net), copy.deepcopy(net)
    gm_o, gm_p = trace(original), trace(pruned)
    with torch.no_grad():
        for unit in graph.units:
            block = graph.block_of(unit.consumer) if block_target else None
            target = None
            if block is not None:
                scale = api._bn_scale(pruned.get_submodule(block.bn))
                target = api._Target(shortcut=block.shortcut, scale=scale)
            stats = api._accumulate(
                unit,
                gm_o,
                gm_p,
                batches,
                target=target,
                samples_per_image=None,
                seed=0,
                progress=False,
            )
            keep, row = api._prune_one(
                unit,
                unit.width,
                stats,
                pruned,
                method="lasso",
                reconstruct="lstsq",
                seed=0,
                row_scale=None if target is None else target.scale,
            )
            assert keep.tolist() == list(range(unit.width))
            assert row.error_after < 1e-6  # float32 rounding of the network, ridge
            if unit.kind == "sampler":
                gm_p.set_submodule(unit.consumer, pruned.get_submodule(unit.consumer))
        assert sum(isinstance(m, SampledConv2d) for m in pruned.modules()) == 9
        out, ref = pruned(x), net(x)
        assert _rel(out, ref) ** 0.5 <= 1e-4  # ‖out − ref‖ / ‖ref‖ after 18 float32 re-fits


# --------------------------------------------------------------------------- torchvision

# basic and bottleneck blocks; a bottleneck ResNet with one block per stage has every
# kind of unit resnet50 has, at a fraction of its cost (30 s)
_TV_FAST = ["resnet18", "bottleneck_tiny"]
_TV_SLOW = ["resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2"]


def _torchvision_resnet(name: str) -> nn.Module:
    if name == "bottleneck_tiny":
        resnet = torchvision.models.resnet
        return resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1])
    return getattr(torchvision.models, name)(weights=None)


@pytest.fixture(scope="module")
def tv_calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return list(torch.randn(16, 3, 64, 64, generator=g).split(8))


def _check_torchvision(name: str, calib: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    net = randomize_bn(_torchvision_resnet(name)).eval()
    x = torch.cat(calib)
    ref_blocks = _block_outputs(net, x[:2], _TV_BLOCKS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # under-determined deep layers
        # the graph handling under test; allocation="auto" on a torchvision ResNet:
        # test_torchvision_resnet_lasso
        kw = {"method": "thinet", "allocation": "uniform", "progress": False}
        result = recon.prune(net, calib, speedup=2.0, **kw)
        plain = recon.prune(net, calib, speedup=2.0, reconstruct="none", **kw)
    assert result.report.output_error < plain.report.output_error, name
    report = result.report
    assert report.speedup == pytest.approx(2.0, rel=0.02), name
    with torch.no_grad():
        assert result.model(x[:2]).shape == (2, 1000)
    blocks = _block_outputs(result.model, x[:2], _TV_BLOCKS)
    assert [b.shape for b in blocks] == [b.shape for b in ref_blocks]  # block widths kept
    assert len(report.blocks) == len(ref_blocks)
    assert any(r.kind == "sampler" for r in report.layers)


@pytest.mark.parametrize("name", _TV_FAST)
def test_torchvision_resnets(name, tv_calib):
    _check_torchvision(name, tv_calib)


@pytest.mark.slow
@pytest.mark.parametrize("name", _TV_SLOW)
def test_torchvision_resnets_large(name, tv_calib):
    _check_torchvision(name, tv_calib)


@pytest.mark.slow  # 30 s; auto on a ResNet in the default run: test_allocation_api
def test_torchvision_resnet_lasso(tv_calib):
    """LASSO with the default allocation="auto" on a torchvision ResNet, wide layers
    included (obs, the default method, prunes torchvision models in test_api's
    test_torchvision_speedup2)."""
    torch.manual_seed(0)
    net = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = recon.prune(net, tv_calib, speedup=2.0, method="lasso", progress=False)
    assert result.report.speedup == pytest.approx(2.0, rel=0.02)
    assert result.report.output_error < 0.5
    assert result.report.allocation is not None


# --------------------------------------------------------------------------- unsupported


class _TwoBranches(nn.Module):
    """x + f(x) + ... where both operands of the add are two-conv branches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.a2(F.relu(self.a1(x))) + self.b2(F.relu(self.b1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _untouched_calib():
    """A calibration iterable that fails the test if recon starts reading it."""
    yield pytest.fail("calibration data was read before the model was refused")


@pytest.mark.parametrize(
    ("build", "match"),
    [(_TwoBranches, r"'add'.*two branches")],
    ids=["two-branches"],  # grouped convs are pruned now: test_grouped.py
)
def test_unsupported_pattern_is_refused_before_calibration(build, match):
    torch.manual_seed(0)
    net = build().eval()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=match) as exc:
        recon.prune(net, _untouched_calib(), keep_ratio=0.5, progress=False)
    assert "cannot prune" in str(exc.value)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arg", ["sampler_layers", "block_target"])
def test_flags_must_be_bool(arg):
    net = cifar_resnet20().eval()
    with pytest.raises(TypeError, match=f"'{arg}'"):
        recon.prune(net, torch.randn(4, 3, 8, 8), keep_ratio=0.5, progress=False, **{arg: 1})


# --------------------------------------------------------------------------- graph cases


class _PreAct(nn.Module):
    """A pre-activation block: the branch starts with BN + ReLU before its first conv."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        x = x + out
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_preactivation_block():
    torch.manual_seed(0)
    net = randomize_bn(_PreAct()).eval()
    graph = find_units(net)
    (block,) = graph.blocks
    assert block.convs == ("conv1", "conv2") and block.sampler and block.bn is None
    assert block.linear_tail  # conv2 feeds the add directly: the block target applies
    assert graph.names == ["conv1.sampler", "conv1"]
    x = torch.randn(64, 3, 8, 8)
    result = recon.prune(net, x, keep_ratio=0.5, progress=False)
    assert isinstance(result.model.conv1, SampledConv2d)
    assert result.model(x).shape == (64, 10)
    assert result.report.output_error < 0.5


def test_bottleneck_blocks_are_found():
    graph = find_units(torchvision.models.resnet50(weights=None))
    assert len(graph.blocks) == 16
    first = graph.blocks[0]
    assert first.name == "layer1.0"
    assert first.convs == ("layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3")
    assert first.shortcut == "layer1_0_downsample_1" and first.bn == "layer1.0.bn3"
    assert graph.blocks[1].shortcut == "layer1_0_relu_2"  # identity: the previous output
    kinds = [u.kind for u in graph.units[:3]]
    assert kinds == ["sampler", "plain", "plain"]
    assert graph.unit("layer1.1.conv1.sampler").width == 256


def test_pruning_a_pruned_resnet_composes_samplers(trained, digits):
    x_train = digits[0]
    calib = x_train[:300].split(100)
    first = recon.prune(trained, calib, keep_ratio=0.75, progress=False)
    conv = first.model.layer2[1].conv1
    before = conv.sampler.index.tolist()
    second = recon.prune(first.model, calib, keep_ratio=0.5, progress=False)
    after = second.model.layer2[1].conv1
    assert set(after.sampler.index.tolist()) < set(before)  # a subset of what it read
    assert after.sampler.in_channels == conv.sampler.in_channels == 32
    assert second.model(x_train[:4]).shape == (4, 10)
    assert second.report.speedup > 1.5


# --------------------------------------------------------------------------- CLI


def test_cli_resnet_with_and_without_samplers(tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 3, 16, 16), calib)
    for flag, samplers in (("--sampler-layers", True), ("--no-sampler-layers", False)):
        report = tmp_path / f"report{samplers}.json"
        code = main(
            [
                "prune",
                "--model",
                "recon.models:cifar_resnet20",
                "--data",
                str(calib),
                "--speedup",
                "1.5",
                flag,
                "--report",
                str(report),
                "--quiet",
            ]
        )
        assert code == 0
        data = json.loads(report.read_text())
        kinds = {row["kind"] for row in data["layers"]}
        assert ("sampler" in kinds) == samplers
        assert set(data["blocks"]) == {f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)}
    assert "block" in capsys.readouterr().out
