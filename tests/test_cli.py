"""The command line, run in-process through ``recon.cli.main``."""

from __future__ import annotations

import json
import re

import pytest
import torch

from recon.cli import build_parser, main
from recon.models import vgg11


def make_vgg():  # a factory for the 'package.module:factory' spec
    torch.manual_seed(0)
    return vgg11(width=0.125)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--weights",
        "--data",
        "--speedup",
        "--keep-ratio",
        "--channels",
        "--method",
        "--reconstruct",
        "--samples-per-image",
        "--ignore",
        "--out",
        "--report",
    ):
        assert flag in out
    # every option of the parser has a help text
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    for action in prune._actions:
        assert action.help, action.option_strings


def test_prune_factory_and_tensor_file(tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, 32, 32), calib)
    weights = tmp_path / "w.pt"
    torch.save(make_vgg().state_dict(), weights)
    out, report = tmp_path / "small.pt", tmp_path / "report.json"
    code = main(
        [
            "prune",
            "--model",
            "tests.test_cli:make_vgg",
            "--weights",
            str(weights),
            "--data",
            str(calib),
            "--keep-ratio",
            "0.5",
            "--method",
            "thinet",
            "--out",
            str(out),
            "--report",
            str(report),
            "--quiet",
        ]
    )
    assert code == 0
    assert "features.0" in capsys.readouterr().out
    small = torch.load(out, weights_only=False)
    assert small.features[0].out_channels == 4  # 8 channels, half kept
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    data = json.loads(report.read_text())
    assert data["method"] == "thinet" and len(data["layers"]) == 8


def test_prune_channels_and_npy(tmp_path):
    import numpy as np

    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype("float32"))
    out = tmp_path / "small.pt"
    code = main(
        [
            "prune",
            "--model",
            "tests.test_cli:make_vgg",
            "--data",
            str(calib),
            "--channels",
            "features.0=3,features.4=5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    small = torch.load(out, weights_only=False)
    assert small.features[0].out_channels == 3 and small.features[4].out_channels == 5


@pytest.mark.parametrize(
    "argv, match",
    [
        (["prune", "--model", "nope", "--data", "digits"], "--model"),
        (["prune", "--model", "tests.test_cli:missing", "--data", "digits"], "--model"),
        (["prune", "--model", "tests.test_cli:make_vgg", "--data", "missing.pt"], "--data"),
        (["prune", "--model", "tests.test_cli:make_vgg"], "both --model and --data"),
        (
            ["prune", "--model", "recon.models:digits_vgg", "--data", "digits", "--speedup", "0.5"],
            "speedup",
        ),
        (
            ["prune", "--model", "tests.test_cli:make_vgg", "--data", "digits"],
            "do not fit the model",
        ),
    ],
)
def test_bad_input_exits_2_with_message(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_embedded_default(capsys):
    """`recon prune` alone prunes the shipped VGG-16 on the embedded Fashion-MNIST data."""
    assert main(["prune", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "method=lasso" in out and "method=thinet" in out
    acc = {}
    for m in re.finditer(r"^\s+(original|lasso|thinet)\s.*?([\d.]+)%", out, re.M):
        acc[m[1]] = float(m[2])
    assert set(acc) == {"original", "lasso", "thinet"}
    assert acc["original"] > 92
    # 2x without fine-tuning; the quality bar itself is measured by scripts/reproduce.py
    assert acc["lasso"] > acc["original"] - 3 and acc["thinet"] > acc["original"] - 3


def test_pretrained_spec_and_builtin_fmnist(capsys):
    code = main(
        [
            "prune",
            "--model",
            "pretrained:vgg16_fmnist",
            "--data",
            "fmnist",
            "--max-images",
            "256",
            "--keep-ratio",
            "0.75",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy on fmnist" in out
    assert main(["eval", "--model", "pretrained:vgg16_fmnist"]) == 0
    assert "2000 embedded Fashion-MNIST" in capsys.readouterr().out
