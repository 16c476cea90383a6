"""Shipped pretrained baselines: manifest, integrity check, accuracy on the embedded data."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from recon import models
from recon.data import evaluate, load_embedded


@pytest.fixture(scope="module")
def embedded():
    return load_embedded()


def test_manifest_lists_shipped_files():
    names = models.pretrained_names()
    assert "vgg16_fmnist" in names
    manifest = json.loads(models.PRETRAINED_MANIFEST.read_text())
    for name in names:
        entry = manifest[name]
        path = models.PRETRAINED_MANIFEST.parent / entry["file"]
        assert path.stat().st_size < 4_000_000  # small enough to ship
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        for key in ("builder", "kwargs", "seed", "epochs", "test_accuracy", "command"):
            assert key in entry, (name, key)


@pytest.mark.parametrize("name", models.pretrained_names())
def test_pretrained_is_accurate_on_the_embedded_eval_set(name, embedded):
    _, _, x_eval, y_eval = embedded
    model = models.pretrained(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    acc = evaluate(model, x_eval, y_eval)
    manifest = json.loads(models.PRETRAINED_MANIFEST.read_text())
    # the eval images are 2,000 of the 10,000 test images the manifest's accuracy is on
    assert acc == pytest.approx(manifest[name]["test_accuracy"], abs=0.02)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="vgg16_fmnist"):
        models.pretrained("resnet9000")


def _fake_manifest(tmp_path, monkeypatch, data: bytes | None, sha: str | None = None):
    net = models.vgg16(width=0.125, in_channels=1)
    torch.save(net.state_dict(), tmp_path / "tiny.pt")
    data = (tmp_path / "tiny.pt").read_bytes() if data is None else data
    (tmp_path / "tiny.pt").write_bytes(data)
    entry = {
        "builder": "vgg16",
        "kwargs": {"width": 0.125, "in_channels": 1},
        "file": "tiny.pt",
        "sha256": sha or hashlib.sha256(data).hexdigest(),
        "command": "python scripts/train.py tiny",
    }
    (tmp_path / "pretrained.json").write_text(json.dumps({"tiny": entry}))
    monkeypatch.setattr(models, "PRETRAINED_MANIFEST", tmp_path / "pretrained.json")
    return net


def test_loads_what_the_manifest_names(tmp_path, monkeypatch):
    net = _fake_manifest(tmp_path, monkeypatch, None)
    loaded = models.pretrained("tiny")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))


def test_damaged_checkpoint_is_refused(tmp_path, monkeypatch):
    _fake_manifest(tmp_path, monkeypatch, None, sha="0" * 64)
    with pytest.raises(ValueError, match="damaged"):
        models.pretrained("tiny")


def test_missing_checkpoint_says_how_to_regenerate(tmp_path, monkeypatch):
    _fake_manifest(tmp_path, monkeypatch, None)
    (tmp_path / "tiny.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"scripts/train\.py tiny"):
        models.pretrained("tiny")
