"""Bad input to ``recon.prune``: a clear error naming the argument, and no side effects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import recon
from recon import models

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return models.vgg11(width=0.125).train()  # widths 8, 16, 32, 32, 64, 64, 64, 64


def _snapshot(m: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return state, {n: mod.training for n, mod in m.named_modules()}


def _unchanged(m: nn.Module, snap) -> bool:
    state, modes = snap
    now = m.state_dict()
    if now.keys() != state.keys():
        return False
    for k, v in state.items():
        w = now[k]
        if w.shape != v.shape or not torch.equal(w.isnan(), v.isnan()):
            return False
        if not torch.equal(torch.nan_to_num(w), torch.nan_to_num(v)):
            return False
    return modes == {n: mod.training for n, mod in m.named_modules()}


def _check(m: nn.Module, calib, exc, match: str, **kwargs):
    snap = _snapshot(m)
    kwargs.setdefault("progress", False)
    if not any(k in kwargs for k in ("speedup", "keep_ratio", "channels", "_no_target")):
        kwargs["keep_ratio"] = 0.5
    kwargs.pop("_no_target", None)
    with pytest.raises(exc, match=match) as info:
        recon.prune(m, calib, **kwargs)
    assert _unchanged(m, snap), "the caller's model was modified"
    return info.value


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("method", ["nope", "LASSO", None, 3])
def test_unknown_method(model, method):
    err = _check(model, X, ValueError, "'method'", method=method)
    assert "lasso" in str(err)  # lists the valid choices


@pytest.mark.parametrize("reconstruct", ["exact", None])
def test_unknown_reconstruct(model, reconstruct):
    err = _check(model, X, ValueError, "'reconstruct'", reconstruct=reconstruct)
    assert "lstsq" in str(err)


def test_zero_targets(model):
    _check(model, X, ValueError, "'speedup', 'keep_ratio' and 'channels'", _no_target=True)


@pytest.mark.parametrize(
    "targets",
    [
        {"speedup": 2.0, "keep_ratio": 0.5},
        {"keep_ratio": 0.5, "channels": {"features.0": 4}},
        {"speedup": 2.0, "keep_ratio": 0.5, "channels": {"features.0": 4}},
    ],
)
def test_two_targets(model, targets):
    err = _check(model, X, ValueError, "Exactly one", **targets)
    assert "'speedup'" in str(err) and "'keep_ratio'" in str(err)


@pytest.mark.parametrize("speedup", [0.5, 0.0, -2.0, math.nan, math.inf, 1e6])
def test_bad_speedup_value(model, speedup):
    _check(model, X, ValueError, "'speedup'", speedup=speedup)


@pytest.mark.parametrize("speedup", ["2", True])
def test_bad_speedup_type(model, speedup):
    _check(model, X, TypeError, "'speedup'", speedup=speedup)


@pytest.mark.parametrize("ratio", [0, 0.0, 1.5, -0.5, math.nan])
def test_bad_keep_ratio_value(model, ratio):
    _check(model, X, ValueError, "'keep_ratio'", keep_ratio=ratio)


@pytest.mark.parametrize("ratio", ["0.5", True])
def test_bad_keep_ratio_type(model, ratio):
    _check(model, X, TypeError, "'keep_ratio'", keep_ratio=ratio)


@pytest.mark.parametrize(
    ("ratio", "exc"),
    [(0.0, ValueError), (2.0, ValueError), (-1, ValueError), ("x", TypeError), (None, TypeError)],
)
def test_bad_keep_ratio_dict_value(model, ratio, exc):
    _check(model, X, exc, r"keep_ratio\['features.4'\]", keep_ratio={"features.4": ratio})


@pytest.mark.parametrize(("count", "exc"), [(0, ValueError), (9, ValueError), (-1, ValueError)])
def test_bad_channel_count(model, count, exc):
    err = _check(model, X, exc, r"channels\['features.0'\]", channels={"features.0": count})
    assert "[1, 8]" in str(err)  # gives the valid range (the width is 8)


@pytest.mark.parametrize("count", [2.5, "4", True])
def test_bad_channel_count_type(model, count):
    _check(model, X, TypeError, r"channels\['features.0'\]", channels={"features.0": count})


def test_channels_not_a_dict(model):
    _check(model, X, TypeError, "'channels'", channels=4)


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("keep_ratio", {"nope": 0.5}),
        ("keep_ratio", {"features.1": 0.5}),  # a BatchNorm, not a unit
        ("channels", {"classifier": 3}),
        ("ignored_layers", ["features.0", "nope"]),
        ("ignored_layers", "nope"),
    ],
)
def test_unknown_layer_names(model, arg, value):
    err = _check(model, X, ValueError, f"'{arg}'", **{arg: value})
    assert "unknown" in str(err) and "features.0" in str(err)  # lists valid names


def test_layer_both_targeted_and_ignored(model):
    _check(
        model,
        X,
        ValueError,
        "'keep_ratio'.*'ignored_layers'",
        keep_ratio={"features.0": 0.5},
        ignored_layers=["features.0"],
    )


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.conv_b(F.relu(self.conv_a(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.head(x)), 1)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_ratio": {"conv_b": 0.5}},
        {"channels": {"stem": 4}},
        {"keep_ratio": 0.5, "ignored_layers": ["conv_b"]},
    ],
)
def test_conv_that_cannot_be_pruned(kwargs):
    torch.manual_seed(0)
    net = _Residual()
    err = _check(net, X, ValueError, "cannot prune", **kwargs)
    name = next(iter(kwargs.get("ignored_layers") or next(v for v in kwargs.values())))
    assert f"'{name}'" in str(err)
    assert "coupled" in str(err)  # the reason


def test_residual_model_prunes_its_units():
    """Sanity check for the model above: its plain units and the sampler can be pruned."""
    torch.manual_seed(0)
    net = _Residual().eval()
    result = recon.prune(net, X, keep_ratio=0.5, progress=False)
    assert set(result.kept) == {"conv_a.sampler", "conv_a", "head"}
    assert result.model(X).shape == (8, 10)
    result = recon.prune(net, X, keep_ratio=0.5, sampler_layers=False, progress=False)
    assert set(result.kept) == {"conv_a", "head"}


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.a(F.relu(self.a(F.relu(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(x), 1), 1))


def test_shared_conv_cannot_be_pruned():
    torch.manual_seed(0)
    net = _Shared()
    err = _check(net, X, ValueError, "'channels'.*'a'.*cannot prune", channels={"a": 4})
    assert "shared weights" in str(err)
    # The rest of the model still prunes, and the result runs.
    result = recon.prune(net.eval(), X, keep_ratio=0.5, progress=False)
    assert set(result.kept) == {"head"}
    assert result.model(X).shape == (8, 10)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "calib",
    [
        torch.empty(0, 3, 32, 32),
        [],
        [torch.empty(0, 3, 32, 32)],
        DataLoader(TensorDataset(torch.empty(0, 3, 32, 32)), batch_size=4),
    ],
    ids=["empty_tensor", "empty_list", "list_of_empty", "empty_loader"],
)
def test_empty_calibration(model, calib):
    _check(model, calib, ValueError, "'calib'")


@pytest.mark.parametrize(
    "calib",
    [
        torch.randn(4, 1, 32, 32),  # 1-channel images to a 3-channel model
        torch.randn(4, 3, 16, 16),  # too small for the classifier
        torch.randn(3, 32, 32),  # a single image without the batch dimension
        torch.randn(4, 3 * 32 * 32),
    ],
    ids=["one_channel", "small_images", "no_batch_dim", "flat"],
)
def test_calib_wrong_shape(model, calib):
    _check(model, calib, ValueError, "'calib'")


def test_calib_batches_of_different_shapes(model):
    _check(model, [X[:4], torch.randn(4, 3, 16, 16)], ValueError, "'calib'")


def test_calib_integer_images(model):
    _check(model, (X * 50).to(torch.uint8), ValueError, "'calib'")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["tensor", "second_batch", "loader"])
def test_calib_non_finite(model, bad, where):
    x = X.clone()
    x[5, 1, 3, 4] = bad
    calib = {
        "tensor": x,
        "second_batch": [x[:4], x[4:]],
        "loader": DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=3),
    }[where]
    _check(model, calib, ValueError, "'calib'.*non-finite")


@pytest.mark.parametrize(
    "calib",
    ["images/", b"bytes", 5, None, [X[:4], "oops"], [[]], np.array(["a", "b"]), [{"image": "a"}]],
    ids=[
        "str",
        "bytes",
        "int",
        "none",
        "list_with_str",
        "list_of_empty_list",
        "str_array",
        "dict_str",
    ],
)
def test_calib_wrong_type(model, calib):
    _check(model, calib, TypeError, "'calib'")


def test_calib_dict_without_a_known_key(model):
    err = _check(model, {"a": X, "b": X}, ValueError, "'calib'.*input_key=")
    assert "['a', 'b']" in str(err)


def test_calib_dict_missing_input_key(model):
    _check(model, [{"image": X}], ValueError, "'input_key' 'pixels'", input_key="pixels")


def test_input_key_not_a_str(model):
    _check(model, {"image": X}, TypeError, "'input_key'.*int", input_key=3)


def test_calib_integer_numpy_images(model):
    _check(model, (X.numpy() * 50).astype(np.uint8), ValueError, "'calib'")


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize(
    ("param", "bad"),
    [
        ("features.0.weight", math.nan),
        ("classifier.bias", math.inf),
        ("features.1.running_var", math.nan),
    ],
)
def test_non_finite_model(model, param, bad):
    with torch.no_grad():
        model.state_dict()[param].view(-1)[0] = bad
    err = _check(model, X, ValueError, "'model'")
    assert param in str(err)


@pytest.mark.parametrize("obj", [None, "vgg11", {"features.0.weight": torch.zeros(1)}])
def test_model_not_a_module(obj):
    with pytest.raises(TypeError, match="'model'"):
        recon.prune(obj, X, keep_ratio=0.5, progress=False)


def test_untraceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            x = self.a(x)
            return self.b(x) if x.mean() > 0 else self.b(-x)

    torch.manual_seed(0)
    _check(Branchy(), X, ValueError, "Branchy")


def test_model_without_prunable_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    err = _check(net, X, ValueError, "no prunable layers")
    assert "Sequential" in str(err) and "'0'" in str(err)  # names the layer and why


def test_a_grouped_conv_recon_cannot_refit_is_named():
    torch.manual_seed(0)  # 1 channel per group: nothing can be removed from a group
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4))
    err = _check(net, X, ValueError, "no prunable layers")
    assert "'2'" in str(err) and "one channel per group" in str(err)  # names module, why


# --------------------------------------------------------------------------- other arguments


@pytest.mark.parametrize("value", [0, -3])
def test_samples_per_image_value(model, value):
    _check(model, X, ValueError, "'samples_per_image'", samples_per_image=value)


@pytest.mark.parametrize("value", [2.5, "10", True, 10.0])
def test_samples_per_image_type(model, value):
    _check(model, X, TypeError, "'samples_per_image'", samples_per_image=value)


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("max_images", 0),
        ("max_images", 2.0),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", True),
        ("round_to", 0),
        ("round_to", 2.0),
        ("device", "no-such-device"),
        ("block_dtype", "float16"),
        ("block_dtype", torch.bfloat16),
        ("block_dtype", ["float32"]),
        ("min_keep", 1.0),
        ("min_keep", "0.1"),
    ],
)
def test_other_bad_arguments(model, arg, value):
    _check(model, X, ValueError, f"'{arg}'", **{arg: value})


def test_inplace_not_bool(model):
    _check(model, X, TypeError, "'inplace'", inplace="yes")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_ratio": 1.5},
        {"channels": {"features.0": 99}},
        {"speedup": 1e6},
        {"keep_ratio": {"nope": 0.5}},
    ],
)
def test_inplace_bad_target_leaves_model_untouched(model, kwargs):
    _check(model, X, ValueError, f"'{next(iter(kwargs))}", inplace=True, **kwargs)
