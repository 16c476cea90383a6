"""Tests of recon.data (digits split, evaluate) and the embedded default model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from recon import _default
from recon._default import CACHE_FILE, default_model
from recon.data import evaluate, load_digits_split
from recon.models import digits_vgg

# --------------------------------------------------------------------------------------
# load_digits_split
# --------------------------------------------------------------------------------------


def test_split_shapes_dtypes_and_normalisation():
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    assert x_train.shape == (1257, 1, 8, 8)
    assert x_test.shape == (540, 1, 8, 8)
    assert y_train.shape == (1257,) and y_test.shape == (540,)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    assert x_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x_train.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # The test split is normalised with the train statistics, not its own.
    assert x_test.mean().item() != pytest.approx(0.0, abs=1e-5)
    assert abs(x_test.mean().item()) < 0.1


def test_split_is_deterministic_and_seed_dependent():
    a = load_digits_split(seed=3)
    b = load_digits_split(seed=3)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta, tb)
    c = load_digits_split(seed=4)
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_stratified_and_a_partition(seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed, test_fraction=0.25)
    full = np.bincount(digits.target, minlength=10)
    n_test = np.bincount(y_test.numpy(), minlength=10)
    n_train = np.bincount(y_train.numpy(), minlength=10)
    np.testing.assert_array_equal(n_train + n_test, full)
    # Stratified: each class's test count is within 1 of its proportional share.
    assert np.all(np.abs(n_test - full * 0.25) <= 1)
    assert len(y_test) == int(np.ceil(len(digits.target) * 0.25))
    assert len(x_train) == len(y_train) and len(x_test) == len(y_test)


def test_split_is_a_partition_of_the_raw_data():
    """Train and test together are exactly the data set, pixels and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    x = torch.cat([x_train, x_test]).double().reshape(-1, 64)
    # Undo the (unknown) affine normalisation with the known [0, 1] pixel range.
    lo, hi = x.min(), x.max()
    raw = ((x - lo) / (hi - lo) * 16).round().numpy()
    rows_ours = sorted(map(tuple, np.column_stack([raw, torch.cat([y_train, y_test]).numpy()])))
    rows_ref = sorted(map(tuple, np.column_stack([digits.data, digits.target])))
    assert rows_ours == rows_ref


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1])
def test_split_bad_fraction(bad):
    with pytest.raises(ValueError, match="'test_fraction'"):
        load_digits_split(test_fraction=bad)


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------


class ConstantClass(nn.Module):
    """Outputs the one-hot logits of a fixed class; records the mode it ran in."""

    def __init__(self, cls: int, num_classes: int = 10) -> None:
        super().__init__()
        self.cls = cls
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))
        self.child = nn.Identity()
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        onehot = torch.zeros(len(x), self.num_classes)
        onehot[:, self.cls] = 1
        return onehot * self.scale


@pytest.mark.parametrize("cls", [0, 3, 9])
def test_evaluate_constant_model_gives_class_frequency(cls):
    _, _, x_test, y_test = load_digits_split(seed=0)
    model = ConstantClass(cls)
    acc = evaluate(model, x_test, y_test, batch_size=64)
    assert acc == pytest.approx((y_test == cls).double().mean().item())
    assert 0.05 < acc < 0.15
    assert model.seen_training and not any(model.seen_training)
    assert len(model.seen_training) == int(np.ceil(len(y_test) / 64))


def test_evaluate_restores_modes_and_batches_agree():
    torch.manual_seed(0)
    x = torch.randn(50, 1, 8, 8)
    y = torch.randint(0, 10, (50,))
    model = digits_vgg()
    model.train()
    model.features[1].eval()  # a mixed-mode model keeps its mix
    acc = evaluate(model, x, y, batch_size=7)
    assert model.training
    assert not model.features[1].training
    assert model.features[4].training
    assert acc == evaluate(model, x, y, batch_size=50)
    with torch.no_grad():
        model.eval()
        expected = (model(x).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(expected)

    model.eval()
    evaluate(model, x, y)
    assert not model.training


def test_evaluate_perfect_and_bad_arguments():
    y = torch.tensor([2, 2, 2])
    assert evaluate(ConstantClass(2), torch.zeros(3, 1), y) == 1.0
    assert evaluate(ConstantClass(1), torch.zeros(3, 1), y) == 0.0
    with pytest.raises(ValueError, match="'y'"):
        evaluate(ConstantClass(1), torch.zeros(4, 1), y)
    with pytest.raises(ValueError, match="'batch_size'"):
        evaluate(ConstantClass(1), torch.zeros(3, 1), y, batch_size=0)
    with pytest.raises(TypeError, match="'model'"):
        evaluate(lambda x: x, torch.zeros(3, 1), y)


# --------------------------------------------------------------------------------------
# default_model and its cache
# --------------------------------------------------------------------------------------


@pytest.fixture
def spy_train(monkeypatch):
    """Counts calls of recon._default.train while still training for real."""
    calls: list[dict] = []
    real = _default.train

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_default, "train", spy)
    return calls


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_default_model_trains_caches_and_reloads(tmp_path, monkeypatch, spy_train):
    _, _, x_test, y_test = load_digits_split(seed=0)
    rng_before = torch.get_rng_state()

    model = default_model(cache_dir=tmp_path, progress=False)
    assert len(spy_train) == 1
    assert not model.training
    assert evaluate(model, x_test, y_test) >= 0.95
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    path = tmp_path / CACHE_FILE
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_FILE]  # no temp file left
    state = torch.load(path, weights_only=True)
    assert set(state) == set(model.state_dict())

    def no_train(*args, **kwargs):
        raise AssertionError("train must not be called when the cache is valid")

    monkeypatch.setattr(_default, "train", no_train)
    again = default_model(cache_dir=tmp_path, progress=False)
    assert again is not model
    assert not again.training
    torch.testing.assert_close(_outputs(again, x_test), _outputs(model, x_test), rtol=0, atol=0)


def test_default_model_env_cache_dir(tmp_path, monkeypatch, spy_train):
    monkeypatch.setattr(_default, "DEFAULT_EPOCHS", 1)
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "env"))
    default_model(progress=False)
    assert (tmp_path / "env" / CACHE_FILE).is_file()
    assert len(spy_train) == 1
    # An explicit cache_dir wins over the environment.
    default_model(cache_dir=tmp_path / "arg", progress=False)
    assert (tmp_path / "arg" / CACHE_FILE).is_file()
    assert len(spy_train) == 2


def test_default_model_is_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(_default, "DEFAULT_EPOCHS", 1)
    a = default_model(cache_dir=tmp_path / "a", progress=False).state_dict()
    torch.manual_seed(123)  # the global RNG state must not matter
    b = default_model(cache_dir=tmp_path / "b", progress=False).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["garbage", "empty", "wrong_shapes", "wrong_keys", "not_dict"])
def test_default_model_bad_cache_is_retrained(tmp_path, monkeypatch, spy_train, kind):
    monkeypatch.setattr(_default, "DEFAULT_EPOCHS", 1)
    path = tmp_path / CACHE_FILE
    if kind == "garbage":
        path.write_bytes(b"this is not a torch file")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wrong_shapes":
        torch.save(digits_vgg(width=0.5).state_dict(), path)
    elif kind == "wrong_keys":
        state = digits_vgg().state_dict()
        state["extra.weight"] = torch.zeros(1)
        torch.save(state, path)
    else:
        torch.save([torch.zeros(1)], path)

    with pytest.warns(UserWarning, match="retraining"):
        model = default_model(cache_dir=tmp_path, progress=False)
    assert len(spy_train) == 1
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # The cache was overwritten with a loadable state_dict: no warning, no training now.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = default_model(cache_dir=tmp_path, progress=False)
    assert len(spy_train) == 1
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(_outputs(again, x), _outputs(model, x), rtol=0, atol=0)
