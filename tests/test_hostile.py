"""Hostile and odd input: what ``recon.prune`` and ``recon.load`` do with it.

Tried elsewhere, not repeated here: NaN/inf in the calibration data
(``test_bad_input.py::test_calib_non_finite``) and in weights or BatchNorm buffers
(``test_bad_input.py::test_non_finite_model``), ``keep_ratio=0`` and channel counts of
0 (``test_bad_input.py::test_bad_keep_ratio_value`` / ``test_bad_channel_count``),
calibration data in another dtype (``test_api.py::test_float64_calib_for_float32_model``).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from nets import randomize_bn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import recon
from recon import io as recon_io
from recon import models
from recon.select import METHODS
from recon.solve import RECONSTRUCT
from recon.stats import PatchStats

X8 = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
X16 = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _prune(model: nn.Module, calib, **kwargs) -> recon.PruneResult:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="re-fitting", category=UserWarning)
        return recon.prune(model, calib, progress=False, **kwargs)


def _vgg(batch_norm: bool = True, cfg=(8, "M", 8, "M", 8)) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(models.VGG(list(cfg), batch_norm=batch_norm, input_size=8)).eval()


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(models.CifarResNet([1, 1], widths=[8, 16])).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def _all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in model.state_dict().values())


# --------------------------------------------------------------------------- overflow


@pytest.mark.parametrize("inplace", [False, True])
def test_activations_overflowing_on_the_first_image(inplace):
    """Finite weights and data, but the activations overflow float32: refused up front."""
    model = _vgg()
    with torch.no_grad():
        for conv in (model.features[0], model.features[4]):
            conv.weight.mul_(1e20)
    before = _state(model)
    with pytest.raises(ValueError, match=r"'model'.*non-finite.*overflow.*No channels"):
        _prune(model, X8, keep_ratio=0.5, inplace=inplace)
    assert _same(model, before)
    assert model.features[0].out_channels == 8


def test_activations_overflowing_on_a_later_image():
    """Only image 3 overflows: the layer whose statistics it breaks is named."""
    model = _vgg()
    before = _state(model)
    calib = X8.clone()
    calib[3] *= 1e38  # finite in float32, but a conv's sum of them is not
    with pytest.raises(FloatingPointError, match=r"'features.4'.*not finite"):
        _prune(model, calib, keep_ratio=0.5)
    assert _same(model, before)


def test_float16_overflow_is_refused():
    """Weights that are fine in float32 overflow float16's range (65504)."""
    model = _vgg()
    with torch.no_grad():
        for i in (0, 4, 8):
            model.features[i].weight.mul_(100)
    assert torch.isfinite(model(X8)).all()
    with pytest.raises(ValueError, match=r"non-finite.*torch.float16.*float32"):
        _prune(model.half(), X8, keep_ratio=0.5)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "calib",
    [
        X8[:1],
        [X8[:1]],
        DataLoader(TensorDataset(X8[:3], torch.zeros(3)), batch_size=64),
    ],
    ids=["one_image", "list_of_one", "loader_batch_larger_than_data"],
)
def test_calibration_smaller_than_one_batch(calib):
    """Runs, warns that the re-fit is under-determined, and gives finite weights."""
    with pytest.warns(UserWarning, match=r"under-determined"):
        result = recon.prune(_vgg(), calib, keep_ratio=0.5, progress=False)
    assert _all_finite(result.model)
    assert result.model(X8).shape == (16, 10)
    assert all(len(k) == 4 for k in result.kept.values())


# --------------------------------------------------------------------------- tiny layers


def test_one_channel_layers():
    """1-channel inputs and 1-channel layers: nothing to remove there, the rest prunes."""
    torch.manual_seed(0)
    model = models.VGG([1, 8, "M", 1, 4], in_channels=1, input_size=8).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = _prune(model, x, keep_ratio=0.5)
    assert result.channels == {"features.0": 1, "features.3": 4, "features.7": 1, "features.10": 2}
    assert model(x).shape == result.model(x).shape
    result = _prune(model, x, channels={"features.0": 1, "features.3": 1})
    assert result.model.features[3].out_channels == 1
    assert _all_finite(result.model)


def test_one_channel_resnet_stage():
    torch.manual_seed(0)
    model = models.CifarResNet([1, 1], widths=[1, 2]).eval()
    result = _prune(model, X16, keep_ratio=0.5)
    assert set(result.channels.values()) == {1}
    assert result.model(X16).shape == (16, 10)


def test_keep_ratio_giving_zero_channels_is_an_error():
    """A ratio that rounds to 0 channels of a layer is refused before anything changes;
    the smallest ratio that keeps one channel of every layer works."""
    net = _vgg()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"'keep_ratio'.*channels of layer"):
        _prune(net, X8, keep_ratio=1e-6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    result = _prune(net, X8, keep_ratio=0.6 / min(widths))
    assert min(result.channels.values()) == 1
    assert result.model(X8).shape == (16, 10)


# --------------------------------------------------------------------------- degenerate data


def _dead(model: nn.Module, conv: int, channels: list[int]) -> nn.Module:
    """Channels whose pre-ReLU activations are always negative: all-zero outputs."""
    with torch.no_grad():
        model.features[conv].bias[channels] = -1e3
    return model


@pytest.mark.parametrize("method", ["lasso", "thinet", "max_response"])
@pytest.mark.parametrize("reconstruct", RECONSTRUCT)
def test_dead_channels_go_first(method, reconstruct):
    dead = [1, 4, 6]
    model = _dead(_vgg(batch_norm=False), 0, dead)
    result = _prune(model, X8, channels={"features.0": 5}, method=method, reconstruct=reconstruct)
    if method != "max_response":  # a score of the consumer's weights cannot see activations
        assert not set(dead) & set(result.kept["features.0"])
    assert _all_finite(result.model)
    assert all(r.error_before == r.error_before for r in result.report.layers)  # no NaN


# bn_gamma needs a BatchNorm after each producer, which these plain nets lack (its own
# errors and hostile cases are in test_seed_systems.py); below, it gets a BN net.
@pytest.mark.parametrize("method", [m for m in METHODS if m != "bn_gamma"])
def test_all_dead_layer_gives_no_nan(method):
    model = _dead(_vgg(batch_norm=False), 0, list(range(8)))
    result = _prune(model, X8, keep_ratio=0.5, method=method)
    assert _all_finite(result.model)
    for row in result.report.layers:
        assert row.error_before == row.error_before and row.error_after == row.error_after
    with torch.no_grad():
        torch.testing.assert_close(result.model(X8), model(X8), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reconstruct", RECONSTRUCT)
def test_rank_deficient_patch_gram(method, reconstruct):
    """Duplicate channels and constant images: the patch Gram is singular."""
    model = _vgg(batch_norm=method == "bn_gamma")
    with torch.no_grad():
        model.features[0].weight[1] = model.features[0].weight[0]
        if model.features[0].bias is not None:  # a conv before a BatchNorm has none
            model.features[0].bias[1] = model.features[0].bias[0]
    calib = torch.ones(8, 3, 8, 8) * torch.linspace(-1, 1, 8).view(8, 1, 1, 1)
    result = _prune(
        model, calib, keep_ratio=0.5, method=method, reconstruct=reconstruct, samples_per_image=None
    )
    assert _all_finite(result.model)
    for row in result.report.layers:
        assert 0 <= row.error_after < float("inf")
    if reconstruct == "lstsq" and method in ("lasso", "thinet"):
        kept = result.kept["features.0"]
        assert not {0, 1} <= set(kept)  # never both copies of one channel


# --------------------------------------------------------------------------- modes


def test_train_mode_model_is_evaluated_in_eval_mode_and_restored():
    """Dropout and BatchNorm in train mode: the same result as in eval mode, and the
    modes (the pruned copy's and the caller's) are those the caller had."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 4),
    )
    randomize_bn(model)
    model.train()
    model[1].eval()  # a mixed mode
    modes = {n: m.training for n, m in model.named_modules()}
    before = _state(model)
    a = _prune(model, X8, keep_ratio=0.5)
    b = _prune(copy.deepcopy(model).eval(), X8, keep_ratio=0.5)
    assert a.kept == b.kept
    for k, v in b.model.state_dict().items():
        assert torch.equal(a.model.state_dict()[k], v), k
    assert _same(model, before)  # BatchNorm running statistics untouched
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: m.training for n, m in a.model.named_modules()} == modes


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda():
    model = _vgg()
    with pytest.raises(ValueError, match=r"'device'.*'cuda'"):
        _prune(model, X8, keep_ratio=0.5, device="cuda")


def test_meta_device_is_refused():
    with pytest.raises(ValueError, match=r"'device'.*device with data"):
        _prune(_vgg(), X8, keep_ratio=0.5, device="meta")
    with pytest.raises(ValueError, match=r"'model'.*meta device"):
        _prune(_vgg().to("meta"), X8, keep_ratio=0.5)


def test_explicit_cpu_device_moves_calibration():
    """Calibration batches are moved to the model's (or the given) device and dtype."""
    a = _prune(_vgg(), X8, keep_ratio=0.5, device="cpu")
    b = _prune(_vgg(), X8.double(), keep_ratio=0.5, device=torch.device("cpu"))
    assert a.kept == b.kept
    assert next(a.model.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cpu_mixes_are_moved():
    """Data on another device than the model is moved to the model's device; with
    ``device=``, the copy is pruned there and the caller's model stays where it was."""
    model = _vgg()
    cpu = _prune(model, X8, keep_ratio=0.5)
    on_model = _prune(model, X8.cuda(), keep_ratio=0.5)  # CPU model, CUDA data
    assert next(on_model.model.parameters()).device.type == "cpu"
    moved = _prune(model, X8, keep_ratio=0.5, device="cuda")  # CPU model and data
    assert next(moved.model.parameters()).device.type == "cuda"
    assert next(model.parameters()).device.type == "cpu"
    cuda_model = _prune(_vgg().cuda(), X8, keep_ratio=0.5)  # CUDA model, CPU data
    assert next(cuda_model.model.parameters()).device.type == "cuda"
    assert cpu.kept == on_model.kept


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(dtype, monkeypatch):
    """Statistics in float64, weights cast back: the dtype of every tensor is kept."""
    seen = set()
    update = PatchStats.update

    def spy(self, x, y, *fold):
        seen.add((x.dtype, self.G.dtype))
        return update(self, x, y, *fold)

    monkeypatch.setattr(PatchStats, "update", spy)
    model = _vgg().to(dtype)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    result = _prune(model, X8, keep_ratio=0.5)
    assert seen == {(dtype, torch.float64)}
    assert {k: v.dtype for k, v in result.model.state_dict().items()} == dtypes
    assert _all_finite(result.model)
    ref = _prune(_vgg(), X8, keep_ratio=0.5)
    with torch.no_grad():
        out = result.model(X8.to(dtype)).float()
        expected = ref.model(X8)
    err = float(((out - expected) ** 2).sum() / (expected**2).sum())
    assert err < (1e-4 if dtype == torch.float16 else 1e-2)


# --------------------------------------------------------------------------- saved files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "resnet.pt"
    result = _prune(_resnet(), X16, keep_ratio=0.5)
    recon.save(result, path)
    return path, result


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "random_bytes", "flipped_bytes", "json"],
)
def test_damaged_file(saved, tmp_path, damage):
    raw = saved[0].read_bytes()
    data = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "random_bytes": os.urandom(2048),
        "flipped_bytes": raw[:100] + bytes(b ^ 0xFF for b in raw[100:400]) + raw[400:],
        "json": b'{"format": "recon"}',
    }[damage]
    path = _write(tmp_path / "bad.pt", data)
    with pytest.raises(ValueError, match=r"bad.pt"):
        recon.load(path, _resnet)


def test_file_with_pickled_classes_is_refused(tmp_path):
    """A pickled module would run code on loading: weights_only refuses it."""
    path = tmp_path / "module.pt"
    torch.save({"format": "recon", "model": _resnet()}, path)
    with pytest.raises(ValueError, match=r"module.pt.*cannot be read.*weights_only"):
        recon.load(path, _resnet)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("format"), "not a file written by recon.save"),
        (lambda d: d.update(format_version=7), "format version 7, newer"),
        (lambda d: d.pop("state_dict"), "no valid 'state_dict'"),
        (lambda d: d.pop("plan"), "no 'plan'"),
        (lambda d: d["plan"].update(format_version=3), "plan in .*newer"),
        (
            lambda d: d["plan"]["units"]["layer1.0.conv1"].update(kept=[0, 99]),
            r"plan in .*'layer1.0.conv1'.*\[0, 8\)",
        ),
        (
            lambda d: d["state_dict"].update({"fc.weight": torch.zeros(10, 3)}),
            r"'fc.weight' is \(10, 3\) in the file, \(10, 16\) in the model",
        ),
        (lambda d: d["state_dict"].pop("fc.bias"), "the file has no 'fc.bias'"),
        (lambda d: d["state_dict"].update(extra=torch.zeros(1)), "the model has no 'extra'"),
        (
            lambda d: d["state_dict"]["layer1.0.conv1.sampler.index"].copy_(
                d["state_dict"]["layer1.0.conv1.sampler.index"].flip(0)
            ),
            "sampler.index' in the file differs from the plan",
        ),
    ],
)
def test_mismatched_file(saved, tmp_path, edit, match):
    data = torch.load(saved[0], weights_only=True)
    edit(data)
    path = tmp_path / "edited.pt"
    torch.save(data, path)
    with pytest.raises(ValueError, match=match) as info:
        recon.load(path, _resnet)
    assert "edited.pt" in str(info.value)


def test_plain_state_dict_file(saved, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(saved[1].model.state_dict(), path)
    with pytest.raises(ValueError, match=r"sd.pt.*not a file written by recon.save.*plan"):
        recon.load(path, _resnet)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: models.CifarResNet([1, 1], widths=[16, 16]), "'layer1.0.conv1'.*16.*not 8"),
        (lambda: models.vgg11(width=0.125), "no module 'layer1.0.conv1'"),
    ],
    ids=["other_widths", "other_architecture"],
)
def test_factory_builds_another_model(saved, factory, match):
    with pytest.raises(ValueError, match=f"resnet.pt.*does not fit.*{match}"):
        recon.load(saved[0], factory)


def test_load_bad_arguments(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.pt"):
        recon.load(tmp_path / "nope.pt", _resnet)
    with pytest.raises(TypeError, match=r"'model_factory'.*function"):
        recon.load(saved[0], _resnet())  # a model, not a function building one
    with pytest.raises(TypeError, match=r"'model_factory' argument must return"):
        recon.load(saved[0], lambda: "resnet")
    with pytest.raises(TypeError, match=r"'path'"):
        recon.load(None, _resnet)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failing_save_leaves_the_existing_file_intact(saved, tmp_path, monkeypatch, error):
    path = tmp_path / "model.pt"
    path.write_bytes(saved[0].read_bytes())
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise error

    monkeypatch.setattr(recon_io.torch, "save", broken_save)
    other = _prune(_resnet(), X16, keep_ratio=0.25)
    with pytest.raises(type(error)):
        recon.save(other, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["model.pt"]  # the temporary file is gone
    loaded = recon.load(path, _resnet).eval()
    assert torch.equal(loaded(X16), saved[1].model(X16))
