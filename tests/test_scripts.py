"""Smoke tests of scripts/reproduce.py, quality_bar.py and single_layer.py in --quick mode, run
in-process through their ``main(argv)`` on the shipped ``vgg16_fmnist``."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from _compare import WEIGHT_RTOL

from recon.models import pretrained_names

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(
    "vgg16_fmnist" not in pretrained_names(), reason="vgg16_fmnist is not shipped"
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def _threads(n: int):
    """Run with ``n`` torch threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with _threads(1):
        yield


@pytest.fixture(scope="module")
def reproduce():
    from recon.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return _load("reproduce")


@pytest.fixture(scope="module")
def quality_bar(reproduce):  # needs the same Fashion-MNIST files
    return _load("quality_bar")


@pytest.mark.slow  # 40 s: a docs generator, run with -m slow
def test_quality_bar_quick(quality_bar, tmp_path, capsys):
    quality_bar.main(["--quick", "--out-dir", str(tmp_path)])
    md = (tmp_path / "quality.md").read_text(encoding="utf-8")
    assert "python scripts/quality_bar.py --quick" in md
    rows = [line for line in md.splitlines() if line.startswith(("| 64 ", "| 128 "))]
    # 2 calibration sizes, 4 variants at 64 images, 2 hand-made, 2 auto and 2 obs + auto
    # allocations, and 3 at 4x
    assert len(rows) == 15
    for row in rows:
        speedup = float(row.split("|")[2].strip().rstrip("x"))
        if "4x" in row.split("|")[1]:
            assert 3.7 < speedup < 4.2, row
        else:
            assert 1.4 < speedup < 2.1, row
    assert sum("obs + auto" in row for row in rows) == 3
    # per-layer errors on calibration and held-out images, one column per conv of VGG-16
    calib = next(line for line in md.splitlines() if line.startswith("| calib |"))
    held = next(line for line in md.splitlines() if line.startswith("| held out |"))
    assert len(calib.split("|")) == len(held.split("|")) == 13 + 3
    assert "calibration images" in capsys.readouterr().out


def test_sampler_layout_quick_times_both_paths_on_both_layouts(capsys):
    rows = _load("sampler_layout").main(["--quick", "--batches", "1,2"])
    assert {(r["shape"][0], r["format"]) for r in rows} == {
        (b, f) for b in (1, 2) for f in ("contiguous", "channels_last")
    }
    assert len(rows) == 2 * 2 * 2  # shapes x batches x formats; outputs checked equal inside
    assert all(r["gather_ms"] > 0 and r["default_ms"] > 0 for r in rows)
    # the zero-padded weight only on channels_last input with more positions than outputs
    assert {r["path"] for r in rows if r["format"] == "contiguous"} == {"gather"}
    assert {r["path"] for r in rows if r["shape"][0] == 2 and r["shape"][2] == 8} == {
        "gather",
        "zero-padded weight",
    }
    assert "| gather (ms) | default (ms) |" in capsys.readouterr().out


@pytest.mark.slow  # 22 s: a docs generator, run with -m slow
def test_profile_latency_runs(capsys):
    rows = _load("profile_latency").main(["--batch", "2", "--repeats", "1"])
    assert [name for name, _, _ in rows] == [
        "original",
        "2x",
        "2x, round_to=8",
        "4x",
        "4x, round_to=8",
    ]
    for _, total, ms in rows:
        assert total > 0 and ms["conv"] > 0 and ms["max-pool"] > 0
    assert "| original | 1.00 |" in capsys.readouterr().out


@pytest.mark.slow  # a docs generator, run with -m slow
def test_profile_latency_torchvision_resnet(capsys):
    pytest.importorskip("torchvision")
    argv = ["--model", "torchvision:resnet18", "--size", "32", "--prune-size", "32"]
    rows = _load("profile_latency").main(
        [*argv, "--batch", "1", "--repeats", "1", "--speedups", "2"]
    )
    (_, _, original), (_, _, pruned), _ = rows
    # residual sums in both; sampler index-selects only in the pruned model
    assert original["add"] > 0 and original.get("index-select", 0) == 0
    assert pruned["index-select"] > 0  # the sampler layers' cost is counted on its own
    assert "torchvision:resnet18" in capsys.readouterr().out
    rows = _load("profile_latency").main(
        [*argv, "--batch", "1", "--repeats", "1", "--speedups", "2", "--channels-last"]
    )
    assert all(ms["conv"] > 0 for _, _, ms in rows)
    assert ", channels_last;" in capsys.readouterr().out


@pytest.fixture(scope="module")
def single_layer():
    return _load("single_layer")


def test_reproduce_quick_and_resume(reproduce, tmp_path, capsys, monkeypatch):
    argv = ["--quick", "--models", "no_such_model,vgg16_fmnist", "--methods", "thinet"]
    argv += ["--out-dir", str(tmp_path)]
    assert reproduce.main(argv) == 0
    assert "skipping 'no_such_model'" in capsys.readouterr().out

    lines = (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["method"], r["reconstruct"]) for r in rows] == [
        ("thinet", "lstsq"),
        ("thinet", "none"),
    ]
    for r in rows:
        assert r["model"] == "vgg16_fmnist" and r["target"] == 2.0
        assert (r["calib"], r["n_test"], r["ft_steps"]) == (128, 500, 5)
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_ft"] <= 1 and 0 <= r["acc_original"] <= 1
        assert abs(r["speedup"] / r["target"] - 1) < 0.05
        assert r["prune_seconds"] > 0 and r["ft_seconds"] > 0
        assert math.isfinite(r["error_before"]) and math.isfinite(r["error_after"])
        assert len(r["layer_errors"]) == len(r["channels"]) == 13
    fitted, unfitted = rows
    assert fitted["error_after"] <= fitted["error_before"] + 1e-9  # the re-fit can only help
    assert unfitted["error_after"] == pytest.approx(unfitted["error_before"])
    assert fitted["acc"] > 0.8 > unfitted["acc"]  # at 2x, re-fitting is what keeps accuracy

    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "### vgg16_fmnist" in md and "python scripts/reproduce.py --quick" in md
    cell = f"{100 * fitted['acc']:.2f}% / {100 * fitted['acc_ft']:.2f}%"
    assert f"| thinet | lstsq | uniform | {cell} |" in md
    assert "| thinet | none | uniform |" in md and "torch " in md
    assert (tmp_path / "results_vgg16_fmnist.png").read_bytes()[:8] == PNG_MAGIC

    # --resume: every run is already there, so nothing is pruned again
    def boom(*args, **kwargs):
        raise AssertionError("--resume re-ran a finished run")

    monkeypatch.setattr(reproduce.recon, "prune", boom)
    assert reproduce.main([*argv, "--resume"]) == 0
    assert (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines() == lines
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "python scripts/reproduce.py --quick" in md and "--resume" not in md  # same results

    # --table-only: runs nothing, writes the table of what is done, blank cells for the rest
    both = ["--quick", "--models", "vgg16_fmnist", "--methods", "thinet,lasso"]
    assert reproduce.main([*both, "--out-dir", str(tmp_path), "--table-only"]) == 0
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "**Partial table**: 2 of 4 runs are not done yet" in md
    assert f"| thinet | lstsq | uniform | {cell} |" in md
    assert "| lasso | lstsq | uniform |  |" in md
    assert (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines() == lines
    monkeypatch.undo()


def test_reproduce_recover_adds_recovery_to_resumed_runs(reproduce, tmp_path):
    """--recover on a finished table recovers its obs/lasso lstsq runs without re-running
    their fine-tuning, keeps every other row as it was, and shows the three side by side."""
    argv = ["--quick", "--models", "vgg16_fmnist", "--methods", "thinet,lasso"]
    argv += ["--reconstruct", "lstsq", "--out-dir", str(tmp_path)]
    assert reproduce.main(argv) == 0
    before = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert reproduce.main([*argv, "--resume", "--recover", "3"]) == 0
    after = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(after) == len(before)
    thinet = [r for r in after if r["method"] == "thinet"]
    lasso = [r for r in after if r["method"] == "lasso"]
    assert thinet == [r for r in before if r["method"] == "thinet"]  # not recovered
    (old,) = [r for r in before if r["method"] == "lasso"]
    (new,) = lasso
    assert new["rec_steps"] == 3 and 0 <= new["acc_rec"] <= 1 and new["rec_seconds"] > 0
    assert new["acc_ft"] == old["acc_ft"] and new["acc"] == old["acc"]  # not re-run
    before_err, after_err = new["rec_heldout"]
    assert after_err <= before_err
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "### One-shot, recovered without labels, fine-tuned with labels" in md
    assert "| vgg16_fmnist | 2× | lasso | uniform |" in md


def test_reproduce_allocations_and_rows_recorded_before_them(reproduce, tmp_path):
    argv = ["--quick", "--models", "vgg16_fmnist", "--methods", "thinet", "--reconstruct", "lstsq"]
    argv += ["--no-finetune", "--out-dir", str(tmp_path)]
    assert reproduce.main([*argv, "--allocations", "uniform,auto"]) == 0
    path = tmp_path / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["allocation"] for r in rows] == ["uniform", "auto"]
    uniform, auto = rows
    assert uniform["channels"] != auto["channels"]  # auto split the target its own way
    assert abs(auto["speedup"] / 2.0 - 1) < 0.02
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert f"| thinet | lstsq | auto | {100 * auto['acc']:.2f}% |" in md
    assert "| vgg16_fmnist | 2× | thinet |" not in md  # quality bars: obs and lasso only
    # a row from before --allocations (no "allocation" key) counts as uniform on --resume
    del uniform["allocation"]
    path.write_text(json.dumps(uniform) + "\n", encoding="utf-8")
    reproduce.recon.prune, prune = None, reproduce.recon.prune  # nothing may be re-run
    try:
        assert reproduce.main([*argv, "--resume"]) == 0
    finally:
        reproduce.recon.prune = prune
    assert f"| thinet | lstsq | uniform | {100 * uniform['acc']:.2f}% |" in (
        tmp_path / "results.md"
    ).read_text(encoding="utf-8")


def test_reproduce_distillation_settings_key_the_rows(reproduce):
    def settings(*argv):
        parser = reproduce.build_parser()
        args = parser.parse_args(list(argv))
        reproduce._resolve(args, parser)
        return reproduce._settings(args)

    plain = settings()
    assert "ft_distill" not in plain  # rows made before the option read as label-only
    kd = settings("--ft-distill", "0.5")
    assert (kd["ft_distill"], kd["ft_temperature"]) == (0.5, 4.0)
    assert settings("--ft-distill", "0.5", "--no-finetune") == settings("--no-finetune")
    row = {"model": "m", "target": 2.0, "method": "obs", "reconstruct": "lstsq"}
    keys = {reproduce._key({**row, **s}) for s in (plain, kd, settings("--ft-distill", "1"))}
    assert len(keys) == 3  # --resume re-runs a row fine-tuned another way


def test_reproduce_paper_findings(reproduce):
    def row(method, rec, target, acc, acc_ft):
        return {"method": method, "reconstruct": rec, "target": target, "acc": acc,
                "acc_ft": acc_ft, "allocation": "uniform"}  # fmt: skip

    rows = [
        row("l1", "lstsq", 2.0, 0.90, 0.92), row("apoz", "lstsq", 2.0, 0.902, 0.918),
        row("l1", "lstsq", 4.0, 0.85, 0.90), row("apoz", "lstsq", 4.0, 0.80, 0.899),
        row("l1", "none", 2.0, 0.10, 0.91), row("apoz", "none", 2.0, 0.10, 0.912),
        row("bn_gamma", "lstsq", 2.0, 0.95, None),  # not fine-tuned
    ]  # fmt: skip
    lines = reproduce._paper_findings("m", rows)
    assert lines[0] == "#### m: what the papers found, checked here"
    apoz = next(line for line in lines if line.startswith("- APoZ"))
    assert "one-shot: +0.20 / -5.00 at 2× / 4×" in apoz
    assert "after fine-tuning: -0.20 / -0.10 at 2× / 4×" in apoz
    assert "without the re-fit, after fine-tuning: +0.20 at 2×" in apoz
    assert "ahead by more than 0.5 point in 0, behind in 1, within noise in 4 of 5" in apoz
    gamma = next(line for line in lines if line.startswith("- Network Slimming"))
    assert "one-shot: +5.00 at 2×" in gamma and "after fine-tuning" not in gamma  # no FT
    assert reproduce._paper_findings("m", rows[:2])[2].endswith(
        "holds here: every difference is within noise."
    )
    assert reproduce._paper_findings("m", [rows[0]]) == []  # nothing to compare


def test_reproduce_min_keep_keys_the_global_rows_only(reproduce):
    args = reproduce.build_parser().parse_args(["--min-keep", "0.5"])
    base = {"model": "m", "target": 2.0, "method": "l1", "reconstruct": "lstsq", "calib": 1000}
    base |= {"n_test": None, "ft_steps": 300, "ft_lr": 0.01, "seed": 0}
    glob = base | {"allocation": "global"}
    assert reproduce._min_keep("global", args) == {"min_keep": 0.5}
    assert reproduce._min_keep("uniform", args) == {}
    # a global row from before the floor had none: min_keep 0, not the default
    assert reproduce._key(glob) == reproduce._key(glob | {"min_keep": 0.0})
    assert reproduce._key(glob) != reproduce._key(glob | {"min_keep": 0.25})
    uniform = base | {"allocation": "uniform"}
    assert reproduce._key(uniform) == reproduce._key(uniform | {"min_keep": 0.25})


def test_reproduce_scratch_rows(reproduce, tmp_path, monkeypatch):
    """--scratch: each kind starts from the weights it names and trains the steps it says
    (the training itself is recon.finetune's, tested on its own: recorded, not run)."""
    import _scratch

    starts, paths = {}, []

    def record(model, x, y, *, steps, lr, batch_size, seed, checkpoint, checkpoint_every, **kw):
        starts[len(starts)] = ({k: v.clone() for k, v in model.state_dict().items()}, steps)
        paths.append(checkpoint)
        checkpoint.parent.mkdir(exist_ok=True)
        checkpoint.write_bytes(b"state")  # deleted once the row is made
        return model.eval()

    monkeypatch.setattr(_scratch, "finetune", record)
    argv = ["--quick", "--models", "vgg16_fmnist", "--methods", "lasso", "--reconstruct"]
    argv += ["lstsq", "--no-finetune", "--scratch", "scratch_e,scratch_b,ticket"]
    argv += ["--scratch-speedups", "2", "--out-dir", str(tmp_path)]
    assert reproduce.main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    pruned, *scratch = rows
    assert "train" not in pruned and [r["train"] for r in scratch] == list(_scratch.KINDS)
    assert len(set(paths)) == 3 and {p.parent for p in paths} == {tmp_path / "checkpoints"}
    assert not any(p.exists() for p in paths) and not any(r["train_resumed"] for r in scratch)
    (e, e_steps), (b, b_steps), (t, t_steps) = starts.values()
    recipe = _scratch.recipe("vgg16_fmnist")
    per_epoch = 60_000 // recipe["batch_size"]
    assert e_steps == t_steps == round(recipe["epochs"] * 0.002 * per_epoch)
    speedup = scratch[1]["speedup"]
    assert b_steps == round(min(2.0, speedup) * recipe["epochs"] * 0.002 * per_epoch) > e_steps
    for r in scratch:  # the architecture of the pruned row
        assert r["channels"] == pruned["channels"] and r["speedup"] == pruned["speedup"]
    # Scratch-E/B: fresh weights of VGG's own scheme; the ticket: the original's initial
    # weights (its builder under its seed) at the kept channels, not the trained ones
    assert torch.equal(e["features.0.weight"], b["features.0.weight"])
    assert torch.equal(e["features.1.weight"], torch.ones_like(e["features.1.weight"]))
    assert float(e["classifier.weight"].std()) < 0.02
    init = _scratch.original_init("vgg16_fmnist").state_dict()["features.0.weight"]
    trained = reproduce.pretrained("vgg16_fmnist").state_dict()["features.0.weight"]
    ticket = t["features.0.weight"]
    assert ticket.shape[0] == pruned["channels"]["features.0"] < init.shape[0]
    for filt in ticket:
        assert any(torch.equal(filt, f) for f in init)
        assert not any(torch.equal(filt, f) for f in trained)
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| FLOPs | allocation | one-shot | fine-tuned | Scratch-E | Scratch-B | ticket |" in md
    assert f"{100 * scratch[2]['acc']:.2f}% |" in md and "ticket's init" in md
    # --resume: nothing is trained again
    monkeypatch.setattr(_scratch, "finetune", None)
    assert reproduce.main([*argv, "--resume"]) == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "argv",
    [
        ["--speedups", "0.5"],
        ["--methods", "magic"],
        ["--calib", "0"],
        ["--seed", "-1"],
        ["--allocations", "even"],
        ["--scratch", "scratch_c"],
        ["--scratch-scale", "0"],
        ["--ft-distill", "1.5"],
        ["--ft-temperature", "0"],
        ["--min-keep", "1"],
    ],
)
def test_reproduce_bad_options(reproduce, argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        reproduce.main([*argv, "--out-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert f"argument {argv[0]}: must be" in capsys.readouterr().err


def test_single_layer_quick(single_layer, tmp_path, capsys):
    assert single_layer.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert "layers: features.0 (16 channels), features.40 (128 channels)" in capsys.readouterr().out
    md = (tmp_path / "single_layer.md").read_text(encoding="utf-8")
    assert "python scripts/single_layer.py --quick" in md
    rows = [line for line in md.splitlines() if line.startswith("| features.")]
    assert len(rows) == 2 * 4  # layers × methods
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] in ("first_k", "max_response", "thinet", "lasso")
        (drop1, err1), (drop2, err2) = (map(float, c.split(" · ")) for c in cells[2:])
        assert drop1 == 0 and err1 == 0  # s = 1 keeps every channel
        assert -100 <= drop2 <= 100 and 0 <= err2 < 1
    assert (tmp_path / "single_layer.png").read_bytes()[:8] == PNG_MAGIC


def test_single_layer_bad_layer(single_layer, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        single_layer.main(["--quick", "--layers", "features.1", "--out-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "not units of vgg16_fmnist" in capsys.readouterr().err


@pytest.mark.slow  # 20 s; recon under torch.distributed itself: tests/test_distributed.py
def test_bench_distributed_quick(tmp_path, capsys):
    bench_distributed = _load("bench_distributed")
    out = tmp_path / "distributed.md"
    rows = bench_distributed.main(["--quick", "--threads", "1", "--out", str(out)])
    assert [(r["nproc"], r["threads"]) for r in rows] == [(1, 1), (2, 1)]
    assert rows[0]["speedup_vs_baseline"] == 1.0 and rows[1]["seconds"] > 0
    # the 2-process model is the 1-process one, up to the order of summation: its largest
    # entry difference relative to the tensor's largest entry (tests/_compare.py)
    assert rows[1]["max_weight_diff"] < WEIGHT_RTOL, rows[1]
    assert rows[1]["flops_speedup"] > 1.8 and "communication" in rows[1]["phases"]
    text = out.read_text()
    assert "| 2 × 1 |" in text and "communication" in text


def test_reproduce_quality_bars(reproduce):
    def row(model, target, acc, acc_ft, method="lasso"):
        return {"model": model, "target": target, "method": method, "reconstruct": "lstsq",
                "acc": acc, "acc_ft": acc_ft}  # fmt: skip

    bases = {"vgg16_fmnist": 0.9400, "resnet20_fmnist": 0.9300}
    rows = [
        row("vgg16_fmnist", 2.0, 0.9360, 0.9390),  # loses 0.40 / 0.10: both met
        row("vgg16_fmnist", 4.0, 0.9200, 0.9300, method="thinet"),  # no bar for it: no line
        row("resnet20_fmnist", 2.0, 0.9150, 0.9290),  # loses 1.50: missed
        row("resnet20_fmnist", 2.0, 0.9260, 0.9290) | {"allocation": "auto"},  # 0.40: met
        row("resnet20_fmnist", 2.0, 0.9270, 0.9290, method="obs") | {"allocation": "auto"},
    ]
    md = "\n".join(reproduce._quality_bars(rows, bases))
    assert "| vgg16_fmnist | 2× | lasso | uniform | without | 93.60% | 0.40 | ≤ 0.5 | met |" in md
    assert "| vgg16_fmnist | 2× | lasso | uniform | after | 93.90% | 0.10 | ≤ 0.3 | met |" in md
    assert (
        "| resnet20_fmnist | 2× | lasso | uniform | without | 91.50% | 1.50 | ≤ 1 | **missed** |"
        in md
    )
    assert "| resnet20_fmnist | 2× | lasso | auto | without | 92.60% | 0.40 | ≤ 1 | met |" in md
    assert "| resnet20_fmnist | 2× | obs | auto | without | 92.70% | 0.30 | ≤ 1 | met |" in md
    assert "4×" not in md
    assert reproduce._quality_bars([], bases) == []


def test_calib_size_quick(reproduce, tmp_path):
    """scripts/calib_size.py: a row per (images, re-fit) and the uniform split, the table."""
    del reproduce  # only for its check that Fashion-MNIST is installed
    script = _load("calib_size")
    script.main(
        ["--quick", "--models", "vgg16_fmnist", "--sizes", "16", "--modes", "lstsq", "none",
         "--out-dir", str(tmp_path)]
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "calib_size.jsonl").read_text().splitlines()]
    got = [(r["images"], r["column"], r["reconstruct"], r["allocation"]) for r in rows]
    assert got == [(16, "lstsq", "lstsq", "auto"), (16, "none", "none", "auto"),
                   (16, "uniform", "lstsq", "uniform")]  # fmt: skip
    assert {r["method"] for r in rows} == {"obs"}  # recon's defaults
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0 and r["heldout_err"] >= 0 and 1.8 < r["speedup"] < 2.2
    assert len(rows[0]["ridges"]) == 13  # a chosen ridge per pruned layer of the VGG-16
    text = (tmp_path / "calib_size.md").read_text()
    assert "| 16 |" in text and "lstsq" in text and "none" in text and "auto − uniform" in text


def test_model_coverage_rows_and_table(reproduce):
    """scripts/model_coverage.py: a pruned model's cells, a refused model's reason."""
    pytest.importorskip("torchvision")
    script = _load("model_coverage")
    row = script.run_model("mobilenet_v3_small", 8, size=32)
    assert row["units"] > 0 and "refused" not in row
    assert "depthwise" in row["skip_summary"]  # its gates are cut (test_depthwise.py)
    cell = row.get("1.5x_lstsq")
    assert "speedup" in cell or "maximum achievable speedup" in cell["error"]
    refused = {"model": "vit_x", "size": 224, "params": 5e6, "refused": "no prunable layer"}
    text = script.markdown([row, refused], ["--quick"], 8, 1.0)
    assert "| `mobilenet_v3_small` |" in text and "refused | refused | no prunable layer |" in text
    assert "1 of 2 models prune" in text


def test_obs_cost_prints_a_row_per_width(capsys):
    obs_cost = _load("obs_cost")
    assert obs_cost.main(["--widths", "8,16", "--kernel", "1"]) == 0
    out = capsys.readouterr().out
    assert "`python scripts/obs_cost.py --widths 8,16 --kernel 1`" in out
    rows = [
        line for line in out.splitlines() if line.startswith("| 8 |") or line.startswith("| 16 |")
    ]
    assert len(rows) == 2 and all(len(r.split("|")) == 9 for r in rows)
    with pytest.raises(SystemExit):
        obs_cost.main(["--widths", "0"])


def test_sensitivity_compare_table():
    """scripts/sensitivity_compare.py: losses per sensitivity, times and the rank agreement."""
    script = _load("sensitivity_compare")
    sens = {"a": 0.1, "b": 0.3, "c": 0.2}
    rows = [
        {"model": "m", "speedup": 2.0, "mode": mode, "acc": acc, "base": 0.9,
         "profile_seconds": t, "sensitivity": s, "seconds": 1.0}
        for mode, acc, t, s in (
            ("probe", 0.88, 9.0, sens),
            ("gradient", 0.885, 3.0, {k: 2 * v for k, v in sens.items()}),  # same ranks
            ("uniform", 0.87, 0.0, {}),
        )
    ]  # fmt: skip
    text = script.markdown(rows, "cmd", 1.0, 1000, 10000, 0)
    assert "| m | 2× | 2.00 | 1.50 | 3.00 | 9.0 / 3.0 | 1.00 |" in text


def test_recover_table_quick(reproduce, tmp_path):
    """scripts/recover_table.py --quick: one cell, its row and its table."""
    table = _load("recover_table")
    table.main(["--quick", "--out-dir", str(tmp_path)])
    (row,) = [json.loads(x) for x in (tmp_path / "recover.jsonl").read_text().splitlines()]
    assert (row["model"], row["speedup"], row["calib"], row["steps"]) == (
        "resnet20_fmnist", 2.0, 64, 5,
    )  # fmt: skip
    assert row["heldout_after"] <= row["heldout_before"]
    assert row["recover_seconds"] > 0 and 0 <= row["recovered"] <= 1
    md = (tmp_path / "recover.md").read_text(encoding="utf-8")
    assert "| resnet20_fmnist (" in md and "Recovered below one-shot in" in md
