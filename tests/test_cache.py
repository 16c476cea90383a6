"""The calibration passes (recon.passes): cached and recomputed paths give the same model.

``recon.prune(cache_bytes=0)`` runs both networks from the input for every unit;
a large budget gathers the original's targets in one pass and runs the pruned network
from the cached layer boundary; a small one caches some batches only. All three must
keep the same channels. With the cut before each producer (``_SINGLE_PASS = False``)
they give the same weights bit for bit; with the cut past it (the default), a cached
value is sliced where a recomputed one comes from the pruned-width conv, so the models
agree to the tolerances of ``_compare`` (the same budget still repeats bit for bit:
tests/test_single_pass.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _compare import assert_same_error, assert_same_outputs, assert_same_state
from nets import randomize_bn
from torch import nn

import recon
import recon.passes
from recon import models
from recon._timing import PHASES
from recon.graph import trace
from recon.passes import DEFAULT_CACHE_BYTES, GraphRunner, Passes


def _prune(net: nn.Module, x: torch.Tensor, **kwargs) -> recon.PruneResult:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="re-fitting", category=UserWarning)
        return recon.prune(net, x.split(8), progress=False, **kwargs)


def _assert_same(a: recon.PruneResult, b: recon.PruneResult) -> None:
    assert a.kept == b.kept
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for la, lb in zip(a.report.layers, b.report.layers, strict=True):
        assert (la.error_before, la.error_after) == (lb.error_before, lb.error_after), la.name
    assert a.report.output_error == b.report.output_error
    assert a.report.blocks == b.report.blocks


def _assert_close(a: recon.PruneResult, b: recon.PruneResult, x: torch.Tensor) -> None:
    """Same channels; weights, outputs and errors within the tolerances of ``_compare``."""
    assert a.kept == b.kept
    assert_same_state(a.model.state_dict(), b.model.state_dict())
    with torch.no_grad():
        assert_same_outputs(a.model(x), b.model(x))
    for la, lb in zip(a.report.layers, b.report.layers, strict=True):
        assert_same_error(la.error_after, lb.error_after, msg=la.name)
    if b.report.output_error is not None:
        assert_same_error(a.report.output_error, b.report.output_error)
    for k, e in b.report.blocks.items():
        assert_same_error(a.report.blocks[k], e, msg=k)


def _vgg_like(width: float = 1.0) -> nn.Module:
    """A VGG-style chain for 16-pixel images: convs, BN, in-place ReLU, pools, linear."""
    return models.VGG([8, 8, "M", 16, 16, "M", 24, "M"], width=width, input_size=16)


class _InplaceResidual(nn.Module):
    """A chain and a residual block written with in-place ops (``+=``, inplace ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 5, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(self.stem(x))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(self.head(self.relu(out)))
        return self.fc(torch.flatten(nn.functional.max_pool2d(out, 2), 1))


class _MutatedFork(nn.Module):
    """A value live at a cached boundary is changed in place after it (``x.mul_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.conv1(x)
        x = x.mul_(0.5)  # runs after the cut before conv1, where x is cached
        h = self.conv2(torch.relu(h))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h + x, 1), 1))


class _LateShortcut(nn.Module):
    """torchvision's BasicBlock order: the shortcut conv runs after the branch, ``+=``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.down = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.down(x)
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def spy(monkeypatch):
    """Records, per run, the budget state: targets stored?, bytes, and cached batches."""
    runs: list[dict] = []
    advance, finish = Passes._advance, Passes.finish

    def _advance(self, b, watch, need):
        if b == 0 and (not runs or runs[-1]["passes"] is not self):
            runs.append({"passes": self, "cached": 0, "recomputed": 0})
        runs[-1]["cached" if self.frontier[b] is not None else "recomputed"] += 1
        return advance(self, b, watch, need)

    def _finish(self, reduce=None):
        runs[-1].update(targets=self.targets is not None, peak=self.peak_held)
        runs[-1].update(targets_bytes=self.targets_bytes)
        return finish(self, reduce)

    monkeypatch.setattr(Passes, "_advance", _advance)
    monkeypatch.setattr(Passes, "finish", _finish)
    return runs


_CASES = [
    ("vgg", _vgg_like, {"speedup": 2.0}),  # allocation="auto": its profile's passes too
    (
        "vgg-all-positions",
        lambda: _vgg_like(0.5),
        {"keep_ratio": 0.5, "samples_per_image": None},
    ),
    (
        "resnet",
        lambda: models.cifar_resnet20(width=0.5),
        {"speedup": 2.0, "allocation": "uniform"},
    ),
    (
        "resnet-branch-target",
        lambda: models.cifar_resnet20(width=0.5),
        {"keep_ratio": 0.5, "block_target": False, "method": "thinet"},
    ),
    ("inplace", _InplaceResidual, {"keep_ratio": 0.5}),
    ("mutated-fork", _MutatedFork, {"keep_ratio": 0.5}),
    ("late-shortcut", _LateShortcut, {"keep_ratio": 0.5}),
]


@pytest.mark.parametrize(
    ("single", "name", "build", "kwargs"),
    [
        pytest.param(
            single, *case, id=f"{'single-pass' if single else 'cut-before-producer'}-{case[0]}"
        )
        for single in (False, True)
        for case in _CASES
        if single or not case[0].startswith("resnet")  # old scheme on ResNet: test_single_pass
    ],
)
def test_cached_and_recomputed_give_the_same_model(
    images, spy, monkeypatch, single, name, build, kwargs
):
    monkeypatch.setattr(recon.passes, "_SINGLE_PASS", single)
    torch.manual_seed(0)
    net = randomize_bn(build()).eval()
    full = _prune(net, images, cache_bytes=1 << 30, **kwargs)
    whole = spy[-1]
    assert whole["targets"] and whole["recomputed"] == len(images.split(8))  # first unit only
    none = _prune(net, images, cache_bytes=0, **kwargs)
    assert not spy[-1]["targets"] and spy[-1]["cached"] == 0
    # targets stored, about half of the boundary values: some batches cached, some not
    half = whole["targets_bytes"] + (whole["peak"] - whole["targets_bytes"]) // 2
    some = _prune(net, images, cache_bytes=half, **kwargs)
    assert spy[-1]["targets"] and spy[-1]["cached"] > 0
    assert spy[-1]["recomputed"] > whole["recomputed"]
    check = _assert_close if single else lambda a, b, _: _assert_same(a, b)
    held_out = torch.randn(8, *images.shape[1:], generator=torch.Generator().manual_seed(9))
    check(full, none, held_out)
    check(full, some, held_out)


def test_cache_keeps_statistics_identical_to_float64_precision(images, monkeypatch):
    """The per-unit float64 statistics agree too (through the errors they give), in the
    older scheme that promises the same arithmetic cached or not (the single pass
    slices a conv run at full width: equal to float32 rounding, checked above)."""
    monkeypatch.setattr(recon.passes, "_SINGLE_PASS", False)
    torch.manual_seed(0)
    net = randomize_bn(models.cifar_resnet20(width=0.5)).eval()
    a = _prune(net, images, speedup=2.0, allocation="uniform", cache_bytes=0)
    b = _prune(net, images, speedup=2.0, allocation="uniform", cache_bytes=1 << 30)
    for la, lb in zip(a.report.layers, b.report.layers, strict=True):
        assert la.error_after == pytest.approx(lb.error_after, rel=1e-10, abs=1e-12)


def test_graph_runner_resumes_from_a_snapshot():
    torch.manual_seed(0)
    net = randomize_bn(models.cifar_resnet20(width=0.25)).eval()
    gm = trace(net)
    runner = GraphRunner(gm)
    x = torch.randn(4, 3, 16, 16)
    n = len(runner)
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for cut in (1, n // 3, n // 2, n - 1):
            snap = runner.run(x, 0, cut, snapshot_at=cut)
            assert sorted(snap) == runner.live(cut)
            out = len(runner) - 1
            runner.run(x, cut, n, snap, watch={out: [lambda v: got.update(y=v)]})
            assert torch.equal(got["y"], net(x)), cut


def test_original_targets_fall_back_when_over_budget(images):
    """A budget below the targets' size: every unit runs the original again, same model."""
    torch.manual_seed(0)
    net = randomize_bn(_vgg_like()).eval()
    a = _prune(net, images, speedup=2.0, allocation="uniform", cache_bytes=1 << 30)
    b = _prune(net, images, speedup=2.0, allocation="uniform", cache_bytes=1_000)
    _assert_close(a, b, images)  # b recomputes every batch: not bit for bit


def test_report_phases_add_up(images):
    torch.manual_seed(0)
    net = randomize_bn(_vgg_like(0.5)).eval()
    report = _prune(net, images, keep_ratio=0.5).report
    assert list(report.phases) == list(PHASES)
    assert all(v >= 0 for v in report.phases.values())
    assert sum(report.phases.values()) == pytest.approx(report.seconds, rel=0.05, abs=0.05)
    assert report.phases["forward"] > 0 and report.phases["stats"] > 0
    again = recon.Report.from_json(report.to_json())
    assert again.phases == report.phases


def test_default_budget_is_one_gib():
    import inspect

    assert inspect.signature(recon.prune).parameters["cache_bytes"].default == DEFAULT_CACHE_BYTES
    assert DEFAULT_CACHE_BYTES == 1 << 30


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB", None])
def test_bad_cache_bytes_is_refused(images, bad):
    net = _vgg_like(0.5).eval()
    with pytest.raises(ValueError, match="'cache_bytes'"):
        recon.prune(net, images, keep_ratio=0.5, cache_bytes=bad, progress=False)


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_final_errors_match_the_returned_model(images, cache_bytes):
    """The passes see the pruned network as it is (samplers swapped in included)."""
    torch.manual_seed(0)
    net = randomize_bn(models.cifar_resnet20(width=0.5)).eval()
    result = _prune(net, images, speedup=2.0, allocation="uniform", cache_bytes=cache_bytes)
    with torch.no_grad():
        ref, out = net(images).double(), result.model(images).double()
    expected = float(((out - ref) ** 2).sum() / (ref**2).sum())
    # recon ran the images in its own batches, so in another float32 summation order
    assert_same_error(result.report.output_error, expected, atol=1e-5)
