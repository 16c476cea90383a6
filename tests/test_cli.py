"""The command line, run in-process through ``recon.cli.main``."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

import recon
from recon.cli import _EPILOG, build_parser, main
from recon.loading import load_model
from recon.models import digits_vgg, vgg11


def make_vgg():  # a factory for the 'package.module:factory' spec
    torch.manual_seed(0)
    return vgg11(width=0.125)


@pytest.mark.parametrize("command", ["prune", "bench"])
def test_every_reconstruct_mode_is_offered(command, capsys):
    from recon.solve import RECONSTRUCT

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(RECONSTRUCT) + "}" in out  # lstsq_plain included


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
    printed = capsys.readouterr().out
    assert "features.0" in printed
    assert f"--model tests.test_cli:make_vgg --weights {out}" in printed  # how to read it back
    assert torch.load(out, weights_only=True)["format"] == "recon"  # plain data
    small = recon.load(out, make_vgg).eval()
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
            "--out-format",
            "module",
            "--quiet",
        ]
    )
    assert code == 0
    small = torch.load(out, weights_only=False)  # a whole pickled module, as asked
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
    assert all(f"method={m}" in out for m in ("obs", "lasso"))
    acc = {}
    for m in re.finditer(r"^\s+(original|obs|lasso)\s.*?([\d.]+)%", out, re.M):
        acc[m[1]] = float(m[2])
    assert set(acc) == {"original", "obs", "lasso"}
    assert acc["original"] > 92
    # 2x without fine-tuning; the quality bar itself is measured by scripts/reproduce.py
    assert all(acc[m] > acc["original"] - 3 for m in ("obs", "lasso"))


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


def test_epilog_line_continuations():
    """Every example line followed by an indented '--option' line ends with a backslash."""
    lines = _EPILOG.splitlines()
    for line, nxt in itertools.pairwise(lines):
        if nxt.lstrip().startswith("--"):
            assert line.endswith(" \\"), line
        if line.endswith("\\"):
            assert nxt.lstrip().startswith("--"), nxt


@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_every_command_documents_unsafe_pickle(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--unsafe-pickle" in out and "runs code" in out


def _randomized_digits_vgg():
    torch.manual_seed(3)
    net = digits_vgg()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.filterwarnings("ignore:re-fitting:UserWarning")
def test_out_then_eval_and_prune_again(tmp_path, capsys):
    """recon prune --out writes a recon file; eval and a second prune read it with
    --model SPEC --weights FILE, and recon.load reads it with the unpruned factory."""
    weights, small, smaller = tmp_path / "w.pt", tmp_path / "small.pt", tmp_path / "smaller.pt"
    torch.save(_randomized_digits_vgg().state_dict(), weights)
    spec = "recon.models:digits_vgg"
    common = ["--data", "digits", "--method", "l1", "--max-images", "64", "--quiet"]
    common += ["--samples-per-image", "4"]
    argv = ["prune", "--model", spec, "--weights", str(weights), *common]
    assert main([*argv, "--keep-ratio", "0.5", "--out", str(small)]) == 0
    pruned_acc = re.search(r"accuracy on digits: [\d.]+% -> ([\d.]+)%", capsys.readouterr().out)
    assert main(["eval", "--model", spec, "--weights", str(small), "--data", "digits"]) == 0
    eval_acc = re.search(r"top-1 accuracy on .*: ([\d.]+)%", capsys.readouterr().out)
    assert eval_acc[1] == pruned_acc[1]  # the same model, read back

    x = torch.randn(4, 1, 8, 8)
    via_cli = load_model(spec, str(small))
    via_python = recon.load(small, digits_vgg).eval()
    assert torch.equal(via_cli(x), via_python(x))
    assert via_cli.features[0].out_channels == 8  # 16, half kept

    argv = ["prune", "--model", spec, "--weights", str(small), *common, "--reconstruct", "none"]
    assert main([*argv, "--keep-ratio", "0.5", "--out", str(smaller)]) == 0
    twice = recon.load(smaller, digits_vgg)  # the plans compose: the unpruned builder reads it
    assert twice.features[0].out_channels == 4


@pytest.mark.filterwarnings("ignore:re-fitting:UserWarning")
def test_torchvision_spec_reads_a_recon_file(tmp_path, monkeypatch):
    """--model torchvision:NAME --weights FILE applies the file's plan (a tiny stand-in for
    torchvision's VGG-11, so that the test runs in a second; the real one is a slow test)."""
    torchvision = pytest.importorskip("torchvision")
    calib = torch.randn(8, 3, 32, 32)
    result = recon.prune(
        make_vgg().eval(), calib, keep_ratio=0.5, method="l1", reconstruct="none", progress=False
    )
    recon.save(result, tmp_path / "small.pt")
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None: make_vgg())
    model = load_model("torchvision:vgg11", str(tmp_path / "small.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), result.model(x))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:re-fitting:UserWarning")
def test_torchvision_resnet18_round_trip(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(8, 3, 64, 64), calib)
    out = tmp_path / "r18.pt"
    argv = ["prune", "--model", "torchvision:resnet18", "--data", str(calib), "--quiet"]
    assert main([*argv, "--speedup", "1.5", "--samples-per-image", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    model = load_model("torchvision:resnet18", str(out))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), recon.load(out, torchvision.models.resnet18).eval()(x))
    assert model.layer1[0].conv1.out_channels < 64


@pytest.mark.parametrize(
    ("out", "match"),
    [("missing/dir/out.pt", "'--out' folder .*missing/dir' does not exist"), (".", "a file")],
)
def test_bad_out_is_refused_before_pruning(tmp_path, out, match, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("recon.prune", lambda *a, **k: pytest.fail("pruned before checking --out"))
    argv = ["prune", "--model", "tests.test_cli:make_vgg", "--data", "digits", "--out", out]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)


# --------------------------------------------------------------------------- finetune


@pytest.mark.filterwarnings("ignore:re-fitting:UserWarning")
def test_finetune_a_pruned_file_then_eval(tmp_path, capsys):
    """prune -> finetune -> eval from the shell: the trained file keeps the plan, is read
    back by eval with the same accuracy that finetune printed, and learned something."""
    small, tuned, again = tmp_path / "small.pt", tmp_path / "tuned.pt", tmp_path / "again.pt"
    start = tmp_path / "start.pt"
    torch.manual_seed(0)  # the untrained start, seeded (the builder draws from torch's RNG)
    torch.save(digits_vgg().state_dict(), start)
    spec = "recon.models:digits_vgg"
    argv = ["prune", "--model", spec, "--weights", str(start), "--data", "digits", "--quiet"]
    argv += ["--method", "l1", "--keep-ratio", "0.5", "--reconstruct", "none"]
    assert main([*argv, "--out", str(small)]) == 0
    capsys.readouterr()
    ft = ["finetune", "--model", spec, "--weights", str(small), "--data", "digits", "--quiet"]
    ft += ["--steps", "100", "--lr", "0.1", "--batch-size", "64"]
    assert main([*ft, "--out", str(tuned)]) == 0
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"([\d.]+)% before, ([\d.]+)% after", out).groups())
    # measured 9.63 % -> 55.00 %; from the untrained start (near chance) it learns
    assert after > before + 20
    assert main(["eval", "--model", spec, "--weights", str(tuned), "--data", "digits"]) == 0
    assert f"{after:.2f}%" in capsys.readouterr().out  # the same model, read back
    model = recon.load(tuned, digits_vgg)
    assert model.features[0].out_channels == 8  # still the pruned architecture
    # the same command and seed give the same weights
    assert main([*ft, "--out", str(again)]) == 0
    a, b = torch.load(tuned, weights_only=True), torch.load(again, weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_finetune_reinit_bn_l1_teacher_and_a_plain_model(tmp_path, capsys):
    spec = "recon.models:digits_vgg"
    start, out = tmp_path / "start.pt", tmp_path / "out.pt"
    torch.save(_randomized_digits_vgg().state_dict(), start)
    ft = ["finetune", "--model", spec, "--weights", str(start), "--data", "digits", "--quiet"]
    ft += ["--steps", "20", "--out", str(out)]

    def gamma_l1() -> float:
        trained = load_model(spec, str(out))  # an unpruned model: a state_dict, read back
        bns = [m for m in trained.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        return float(sum(m.weight.abs().sum() for m in bns))

    teacher = ["--teacher", spec, "--teacher-weights", str(start)]
    assert main([*ft, *teacher]) == 0
    assert "features.0.weight" in torch.load(out, weights_only=True)  # a plain state_dict
    plain = gamma_l1()
    assert main([*ft, *teacher, "--bn-l1", "0.05"]) == 0
    assert gamma_l1() < plain  # the penalty pulls the γ down
    # --reinit: fresh weights, so the first layer no longer equals the start's
    assert main([*ft, "--reinit", "0", "--steps", "1", "--lr", "1e-9"]) == 0
    start_w = torch.load(start, weights_only=True)["features.0.weight"]
    assert not torch.equal(torch.load(out, weights_only=True)["features.0.weight"], start_w)
    capsys.readouterr()


def test_finetune_checkpoint_resumes_and_refuses_another_run(tmp_path, capsys):
    spec = "recon.models:digits_vgg"
    start, ckpt = tmp_path / "start.pt", tmp_path / "state.pt"
    torch.save(_randomized_digits_vgg().state_dict(), start)
    ft = ["finetune", "--model", spec, "--weights", str(start), "--data", "digits", "--quiet"]
    ft += ["--steps", "6", "--checkpoint-every", "4"]
    assert main([*ft, "--out", str(tmp_path / "plain.pt")]) == 0
    assert main([*ft, "--out", str(tmp_path / "a.pt"), "--checkpoint", str(ckpt)]) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    # complete: the same command returns the trained model without training again
    assert main([*ft, "--out", str(tmp_path / "b.pt"), "--checkpoint", str(ckpt)]) == 0
    plain, a, b = (
        torch.load(tmp_path / f, weights_only=True) for f in ("plain.pt", "a.pt", "b.pt")
    )
    assert all(torch.equal(plain[k], a[k]) and torch.equal(a[k], b[k]) for k in plain)
    capsys.readouterr()
    other = [*ft[:-4], "--steps", "7", "--out", str(tmp_path / "c.pt"), "--checkpoint", str(ckpt)]
    assert main(other) == 2
    assert "its steps is 6, this run's is 7" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "'--steps'"),
        (["--checkpoint-every", "0"], "'--checkpoint-every'"),
        (["--reinit", "-1"], "'--reinit'"),
        (["--teacher-weights", "x.pt"], "'--teacher-weights'"),
        (["--lr", "-1"], "'lr'"),
    ],
)
def test_finetune_bad_arguments(tmp_path, capsys, extra, message):
    argv = ["finetune", "--model", "recon.models:digits_vgg", "--data", "digits", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "o.pt"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.filterwarnings("ignore:re-fitting")
def test_prune_with_recover_reports_and_saves_the_recovered_model(tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)), calib)
    out, report = tmp_path / "small.pt", tmp_path / "report.json"
    args = ["prune", "--model", "tests.test_cli:make_vgg", "--data", str(calib)]
    args += ["--speedup", "2", "--allocation", "uniform", "--quiet", "--recover", "8"]
    assert main([*args, "--out", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "recovery" in printed and "held-out output error" in printed
    data = json.loads(report.read_text())
    rec = data["recover"]
    assert rec["steps"] == 8 and rec["images"] + rec["heldout_images"] == 24
    assert "recover" in data["phases"]
    assert rec["error_after"] <= rec["error_before"]
    assert recon.load(out, make_vgg)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert main([*args[:-1], "-1"]) == 2  # refused before anything runs
    assert "The '--recover' must be >= 0 steps. Got -1" in capsys.readouterr().err
