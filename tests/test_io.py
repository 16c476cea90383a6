"""Pruning plans, ``recon.apply_plan``, and ``recon.save`` / ``recon.load`` round trips.

Damaged and mismatched files are in ``test_hostile.py``.
"""

from __future__ import annotations

import json
import os
import pickletools
import zipfile

import pytest
import torch
from nets import quiet_prune as _prune
from nets import randomize_bn
from torch import nn

import recon
from recon import models
from recon._plan import attach
from recon.layers import SampledConv2d

X8 = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
X16 = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
X32 = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _vgg() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(models.vgg11(width=0.125)).eval()


def _vgg_plain() -> nn.Module:
    """A VGG without BatchNorm: convs with biases, ReLU, max-pools, a linear head."""
    torch.manual_seed(0)
    return models.VGG([8, 8, "M", 16, "M", 8], batch_norm=False, input_size=8).eval()


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(models.CifarResNet([2, 1], widths=[8, 16])).eval()


def _no_bias_chain() -> nn.Module:
    """Convs without bias and without a BatchNorm after them: re-fitting adds a bias."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    ).eval()


BUILDERS = {
    "vgg11": (_vgg, X32),
    "vgg_plain": (_vgg_plain, X8),
    "resnet": (_resnet, X16),
    "no_bias": (_no_bias_chain, X8),
}


@pytest.fixture(params=list(BUILDERS))
def case(request):
    build, x = BUILDERS[request.param]
    return build, x, _prune(build(), x, keep_ratio=0.5)


# --------------------------------------------------------------------------- the plan


def test_plan_is_plain_json(case):
    _, _, result = case
    plan = result.plan
    assert json.loads(json.dumps(plan)) == plan
    assert plan["format"] == "recon.plan" and plan["format_version"] == 1
    assert plan["recon_version"] == recon.__version__
    assert plan["torch_version"] == str(torch.__version__)
    assert (plan["method"], plan["reconstruct"], plan["seed"]) == ("obs", "lstsq", 0)
    assert plan["target"] == {"speedup": None, "keep_ratio": 0.5, "channels": None}
    assert plan["history"] == []
    # The plan's kept channels are the result's, unit by unit, in forward order.
    assert {n: e["kept"] for n, e in plan["units"].items()} == result.kept
    assert list(plan["units"]) == list(result.kept)


def test_plan_records_samplers():
    result = _prune(_resnet(), X16, keep_ratio=0.5)
    samplers = {n: m for n, m in result.model.named_modules() if isinstance(m, SampledConv2d)}
    assert samplers  # the case needs sampler layers
    assert set(result.plan["samplers"]) == set(samplers)
    for name, m in samplers.items():
        entry = result.plan["samplers"][name]
        assert entry["index"] == m.sampler.index.tolist()
        assert entry["in_channels"] == m.sampler.in_channels


def test_plan_records_target_and_options():
    result = _prune(
        _vgg_plain(),
        X8,
        channels={"features.0": 3},
        method="thinet",
        reconstruct="scale",
        seed=5,
        samples_per_image=4,
    )
    plan = result.plan
    assert plan["target"]["channels"] == {"features.0": 3}
    assert (plan["method"], plan["reconstruct"], plan["seed"]) == ("thinet", "scale", 5)
    assert plan["options"]["samples_per_image"] == 4
    assert len(plan["units"]["features.0"]["kept"]) == 3


def test_plan_records_added_biases():
    result = _prune(_no_bias_chain(), X8, keep_ratio=0.5)
    assert result.plan["added_biases"] == ["2"]
    assert result.model[2].bias is not None


def test_result_plan_is_a_copy_of_the_models():
    result = _prune(_vgg_plain(), X8, keep_ratio=0.5)
    result.plan["method"] = "changed"
    again = _prune(result.model, X8, keep_ratio=0.5)
    assert again.plan["history"][0]["method"] == "obs"


# --------------------------------------------------------------------------- apply_plan


def test_apply_plan_reshapes_like_prune(case):
    build, x, result = case
    fresh = build()
    reshaped = recon.apply_plan(fresh, result.plan)
    assert reshaped is not fresh
    got = {k: v.shape for k, v in reshaped.state_dict().items()}
    assert got == {k: v.shape for k, v in result.model.state_dict().items()}
    reshaped.load_state_dict(result.model.state_dict())
    assert torch.equal(reshaped.eval()(x), result.model(x))


def test_apply_plan_leaves_the_model_alone_unless_inplace():
    result = _prune(_vgg(), X32, keep_ratio=0.5)
    fresh = _vgg()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    recon.apply_plan(fresh, result.plan)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert recon.apply_plan(fresh, result.plan, inplace=True) is fresh
    assert fresh.features[0].out_channels == len(result.kept["features.0"])


def test_apply_plan_keeps_the_models_own_weights():
    """Without re-fitting: the kept channels' weights are the unpruned model's, sliced."""
    result = _prune(_vgg_plain(), X8, keep_ratio=0.5)
    fresh = _vgg_plain()
    reshaped = recon.apply_plan(fresh, result.plan)
    k0, k2 = (torch.tensor(result.kept[n]) for n in ("features.0", "features.2"))
    assert torch.equal(reshaped.features[0].weight, fresh.features[0].weight[k0])
    assert torch.equal(reshaped.features[2].weight, fresh.features[2].weight[k2][:, k0])


def test_apply_plan_from_json():
    result = _prune(_resnet(), X16, keep_ratio=0.5)
    plan = json.loads(json.dumps(result.plan))
    reshaped = recon.apply_plan(_resnet(), plan)
    reshaped.load_state_dict(result.model.state_dict())
    assert torch.equal(reshaped(X16), result.model(X16))


def test_apply_plan_of_keep_everything_is_the_identity():
    result = _prune(_resnet(), X16, keep_ratio=1.0)
    fresh = _resnet()
    reshaped = recon.apply_plan(fresh, result.plan)
    assert not any(isinstance(m, SampledConv2d) for m in reshaped.modules())
    assert torch.equal(reshaped(X16), fresh(X16))


def test_apply_plan_refuses_a_pruned_model():
    result = _prune(_vgg(), X32, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"'model'.*'features.0' has 4 output channels, not 8"):
        recon.apply_plan(result.model, result.plan)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ([], "expected a dict"),
        ({"format": "other"}, "'format'"),
        ({"format": "recon.plan", "format_version": 99, "units": {}}, "newer"),
        ({"format": "recon.plan", "format_version": 1, "units": []}, "'units'"),
    ],
)
def test_apply_plan_malformed(plan, match):
    with pytest.raises(ValueError, match=f"'plan'.*{match}"):
        recon.apply_plan(_vgg(), plan)


def test_apply_plan_bad_arguments():
    result = _prune(_vgg_plain(), X8, keep_ratio=0.5)
    with pytest.raises(TypeError, match=r"'model'"):
        recon.apply_plan("vgg", result.plan)
    with pytest.raises(TypeError, match=r"'inplace'"):
        recon.apply_plan(_vgg_plain(), result.plan, inplace=1)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(case, tmp_path):
    build, x, result = case
    path = tmp_path / "pruned.pt"
    recon.save(result, path)
    model = recon.load(path, build).eval()
    assert torch.equal(model(x), result.model(x))
    assert recon.load(str(path), build).state_dict().keys() == result.model.state_dict().keys()


def test_file_is_plain_data_for_weights_only(case, tmp_path):
    _, _, result = case
    path = tmp_path / "pruned.pt"
    recon.save(result, path)
    data = torch.load(path, weights_only=True)
    assert data["format"] == "recon" and data["format_version"] == 1
    assert data["plan"] == result.plan
    assert type(data["state_dict"]) is dict
    for k, v in result.model.state_dict().items():
        assert torch.equal(data["state_dict"][k], v), k
    # The pickle refers to no class but torch's tensor rebuilding (whose empty
    # backward-hooks argument is an OrderedDict): nothing of recon's, no code to run.
    with zipfile.ZipFile(path) as z:
        raw = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = {str(arg) for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    allowed = {"torch._utils _rebuild_tensor_v2", "collections OrderedDict"}
    assert all(g in allowed or g.endswith("Storage") for g in globals_), globals_


def test_twice_pruned_resnet_composes_and_loads(tmp_path):
    """A pruned model pruned again: samplers compose, and the plan still fits the
    unpruned architecture."""
    first = _prune(_resnet(), X16, keep_ratio=0.75)
    second = _prune(first.model, X16, keep_ratio=0.5)
    plan = second.plan
    assert (
        plan["history"] == [{k: first.plan[k] for k in plan["history"][0]}]
        and plan["history"][0]["target"]["keep_ratio"] == 0.75
    )
    conv = second.model.layer1[1].conv1
    assert isinstance(conv, SampledConv2d)
    assert plan["samplers"]["layer1.1.conv1"]["index"] == conv.sampler.index.tolist()
    assert plan["samplers"]["layer1.1.conv1"]["in_channels"] == 8
    # Kept channels are numbered in the unpruned network, a subset of the first run's.
    for name, e in plan["units"].items():
        assert set(e["kept"]) <= set(first.plan["units"][name]["kept"]), name
        assert e["width"] == first.plan["units"][name]["width"]
    path = tmp_path / "twice.pt"
    recon.save(second, path)
    model = recon.load(path, _resnet).eval()
    assert torch.equal(model(X16), second.model(X16))
    # ... and the loaded model can be pruned and saved a third time.
    third = _prune(model, X16, keep_ratio=0.75)
    assert len(third.plan["history"]) == 2
    recon.save(third, path)
    assert torch.equal(recon.load(path, _resnet).eval()(X16), third.model(X16))


def test_a_stale_plan_is_dropped_with_a_warning():
    """A model whose carried plan does not fit its layers (changed by hand): the new
    plan describes the run relative to the model as given."""
    half = _prune(_vgg_plain(), X8, keep_ratio=0.5)
    model = _prune(_vgg_plain(), X8, keep_ratio=0.25).model
    attach(model, half.plan)  # a plan of other widths
    with pytest.warns(UserWarning, match="does not match its layers.*'features.0' has 2"):
        again = _prune(model, X8, keep_ratio=0.5)
    assert again.plan["history"] == []
    assert again.plan["units"]["features.0"]["width"] == 2


def test_save_a_model_that_carries_a_plan(tmp_path):
    """A pruned model fine-tuned elsewhere is saved from the module itself."""
    result = _prune(_vgg_plain(), X8, keep_ratio=0.5)
    model = result.model
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # "fine-tuning"
    path = tmp_path / "tuned.pt"
    recon.save(model, path)
    assert torch.equal(recon.load(path, _vgg_plain).eval()(X8), model(X8))
    reshaped = recon.apply_plan(_vgg_plain(), result.plan)
    recon.save(reshaped, path)  # apply_plan's output carries the plan too
    assert recon.load(path, _vgg_plain).features[0].out_channels == 4


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "model.pt"
    a = _prune(_vgg_plain(), X8, keep_ratio=0.5)
    b = _prune(_vgg_plain(), X8, keep_ratio=0.25)
    recon.save(a, path)
    recon.save(b, path)
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left
    assert recon.load(path, _vgg_plain).features[0].out_channels == 2


def test_save_bad_arguments(tmp_path):
    result = _prune(_vgg_plain(), X8, keep_ratio=0.5)
    with pytest.raises(TypeError, match=r"'result'"):
        recon.save(result.model.state_dict(), tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"'result' argument carries no pruning plan"):
        recon.save(_vgg_plain(), tmp_path / "x.pt")
    with pytest.raises(TypeError, match=r"'path'"):
        recon.save(result, 3)
    with pytest.raises(ValueError, match=r"'path'.*folder"):
        recon.save(result, tmp_path)
    with pytest.raises(FileNotFoundError):
        recon.save(result, tmp_path / "no" / "such" / "dir.pt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_load_keeps_dtype(dtype, tmp_path):
    result = _prune(_vgg_plain().to(dtype), X8, keep_ratio=0.5)
    path = tmp_path / "half.pt"
    recon.save(result, path)
    model = recon.load(path, _vgg_plain)  # the factory builds float32
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.equal(model.eval()(X8.to(dtype)), result.model(X8.to(dtype)))
