"""Pruned models deploy: torch.export, TorchScript (script and trace) and ONNX.

Each tool must work on the pruned model wherever it works on the original; the
sampler layer (``index_select`` with a registered buffer) must not get in the way.
A converted model may run other kernels (fused, decomposed), so outputs are compared
in relative terms (tests/_compare.py), not bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _compare import assert_same_outputs
from nets import randomize_bn
from torch import nn

import recon
from recon import models
from recon.layers import SampledConv2d
from recon.models import BasicBlock

X16 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
CALIB = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))


class ScriptableResNet(nn.Module):
    """A small ResNet whose forward TorchScript can compile (CifarResNet's loop over
    stage names cannot be scripted)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _vgg() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(models.VGG([8, "M", 16, "M", 16], input_size=16))


def _cifar_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(models.CifarResNet([2, 1], widths=[8, 16]))


def _scriptable_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(ScriptableResNet())


BUILDERS = {"vgg": _vgg, "cifar_resnet": _cifar_resnet, "scriptable_resnet": _scriptable_resnet}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request):
    """(original, pruned), both in eval mode; the ResNets' pruned models have samplers."""
    original = BUILDERS[request.param]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = recon.prune(original, CALIB, keep_ratio=0.5, progress=False)
    if "resnet" in request.param:
        assert any(isinstance(m, SampledConv2d) for m in result.model.modules())
    return original, result.model.eval()


def _export(m: nn.Module):
    return torch.export.export(m, (X16,)).module()


def _script(m: nn.Module):
    return torch.jit.script(m)


def _trace(m: nn.Module):
    return torch.jit.trace(m, (X16,))


@pytest.mark.parametrize("tool", [_export, _script, _trace], ids=["export", "script", "trace"])
def test_pruned_model_converts_where_the_original_does(pair, tool):
    original, pruned = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices
        try:
            tool(original)
        except Exception as exc:
            pytest.skip(f"the original does not convert either: {type(exc).__name__}")
        converted = tool(pruned)
    with torch.no_grad():
        assert_same_outputs(converted(X16), pruned(X16), rtol=1e-5)


def test_scriptable_resnet_scripts():
    """The case above does not skip for a residual model with sampler layers."""
    original = _scriptable_resnet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(original)
        result = recon.prune(original, CALIB, keep_ratio=0.5, progress=False)
        scripted = torch.jit.script(result.model.eval())
    assert isinstance(result.model.layer1[1].conv1, SampledConv2d)
    with torch.no_grad():
        assert_same_outputs(scripted(X16), result.model(X16), rtol=1e-5)


@pytest.mark.parametrize("name", ["vgg", "cifar_resnet"])
def test_onnx_export_matches_pytorch(name, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    original = BUILDERS[name]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = recon.prune(original, CALIB, keep_ratio=0.5, progress=False).model.eval()
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(pruned, (X16,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X16.numpy()})
    with torch.no_grad():
        expected = pruned(X16)
    assert got.shape == tuple(expected.shape)
    assert_same_outputs(torch.from_numpy(got), expected, rtol=1e-4)  # another runtime's kernels
