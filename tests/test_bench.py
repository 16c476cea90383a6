"""The benchmark (recon.bench, ``recon bench``, scripts/bench.py) runs end to end on a
tiny model and data. Correctness only: no timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from recon import bench, cli
from recon.budget import count_flops
from recon.models import VGG, digits_vgg

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
pytestmark = pytest.mark.filterwarnings("ignore:re-fitting:UserWarning")
TINY = ["--model", "recon.models:digits_vgg", "--data", "digits"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("_script_bench", SCRIPTS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_memory_probes_return_bytes():
    rss, peak = bench.rss_bytes(), bench.peak_rss_bytes()
    assert peak > 0
    if rss is not None:  # Linux
        assert 0 < rss <= peak
        bench.reset_peak_rss()
        assert bench.peak_rss_bytes() <= peak


def test_work_counts_forward_and_statistics():
    torch.manual_seed(0)
    net = VGG([4, "M", 6], in_channels=1, input_size=4, num_classes=3).eval()
    example = torch.zeros(1, 1, 4, 4)
    fwd, stats = bench.work(net, example, images=5, samples_per_image=3)
    assert fwd == count_flops(net, example)[0] // 2 * 5
    # unit features.0 -> features.4 (2x2 map: 3 of 4 positions), d = 4*9, n = 6;
    # unit features.4 -> classifier (linear, one row per image), d = 6*4, n = 3
    d1, d2 = 36, 24
    assert stats == 5 * 3 * (d1 * (d1 + 1) // 2 + d1 * 6) + 5 * (d2 * (d2 + 1) // 2 + d2 * 3)


def test_bench_run_reports_phases_memory_and_ratio():
    torch.manual_seed(0)
    x = torch.randn(48, 1, 8, 8)
    result, pruned = bench.run(digits_vgg().eval(), x, batch_size=16, repeats=1, warmup=False)
    assert result.forward_seconds > 0 and result.prune_seconds > 0
    assert result.ratio == pytest.approx(result.prune_seconds / result.forward_seconds)
    assert set(result.phases) >= {"forward", "stats", "select", "solve", "surgery", "other"}
    assert result.peak_rss > 0 and result.stats_macs > 0 and result.forward_macs > 0
    assert result.flops_ratio == pytest.approx(pruned.report.speedup)
    text = result.to_text()
    assert "forward passes" in text and "peak memory" in text
    json.dumps(result.to_dict())  # JSON-safe
    assert result.block_dtype == "float64" and "block products" not in text
    r32, p32 = bench.run(digits_vgg().eval(), x, batch_size=16, repeats=1, warmup=False,
                         block_dtype="float32")  # fmt: skip
    assert r32.block_dtype == "float32" and "float32 block products" in r32.to_text()
    assert p32.plan["options"]["block_dtype"] == "float32"


def test_recon_bench_cli(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", *TINY, "--max-images", "48", "--batch-size", "16", "--repeats", "1"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "one plain forward pass" in text and "stats" in text
    numbers = json.loads(out.read_text())
    assert numbers["images"] == 48 and numbers["ratio"] > 0
    assert "profile" not in numbers["phases"]  # uniform unless asked
    assert cli.main([*argv, "--allocation", "auto", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["phases"]["profile"] > 0
    assert cli.main([*argv, "--block-dtype", "float32", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["block_dtype"] == "float32"
    assert "float32 block products" in capsys.readouterr().out


def test_recon_prune_takes_cache_mb(tmp_path, capsys):
    argv = ["prune", *TINY, "--max-images", "48", "--keep-ratio", "0.5", "--quiet"]
    assert cli.main([*argv, "--cache-mb", "0"]) == 0
    assert "recon pruning report" in capsys.readouterr().out
    assert cli.main([*argv, "--cache-mb", "-1"]) == 2
    assert "--cache-mb" in capsys.readouterr().err
    assert cli.main([*argv, "--block-dtype", "float32"]) == 0
    with pytest.raises(SystemExit) as exc:  # argparse's choices
        cli.main([*argv, "--block-dtype", "float16"])
    assert exc.value.code == 2
    assert "--block-dtype" in capsys.readouterr().err


def test_bench_script_all_writes_markdown(script, tmp_path, capsys):
    md = tmp_path / "benchmarks.md"
    out = script.main(["all", "--quick", "--in-process", "--threads", "1", "--out", str(md)])
    c = out["compare"]
    assert c["units"] == 5 and c["same_units"] == c["units"]  # same channels as the naive
    assert all(row["same_at_lambda"] for row in c["rows"])
    assert c["recon"]["kept"] == c["naive"]["kept"]
    # float32 block products against the default float64 path, same run
    assert c["recon"]["block_dtype"] == "float64" and c["recon32"]["block_dtype"] == "float32"
    assert c["float32_same_units"] == len(c["recon"]["kept"])
    assert c["float32_error_diff"] < 1e-3
    assert [r["label"] for r in out["scale"]] == ["base"] * 2 + ["images x4"] * 2 + ["width x2"] * 2
    assert out["scale"][2]["images"] == 4 * out["scale"][0]["images"]
    assert len(out["latency"]) == 2 * 2 * 2  # models x targets x batch sizes
    text = md.read_text()
    for heading in ("## Machine", "## 1. recon against", "## 2. Scaling", "## 3. Inference"):
        assert heading in text
    assert "naive / recon" in text and "## Goals" in text
    assert "With float32 block products" in text
    assert "python scripts/bench.py all --quick --in-process" in text
    # the 224-px part (tiny models here): one run per model and allocation, its own page
    runs, lat = out["scale224"]["runs"], out["scale224"]["latency"]
    assert [(r["model"].split(":")[1], r["allocation"]) for r in runs] == [
        (m, a) for m in ("digits_vgg", "digits_resnet20") for a in ("uniform", "auto")
    ]
    for r in runs:
        assert r["ratio"] > 0 and r["peak_rss"] > 0
        assert r["flops_ratio"] == pytest.approx(2.0, rel=0.02)
    assert {(x["format"], x["round_to"]) for x in lat} >= {("contiguous", 1), ("channels_last", 8)}
    assert {r["device"] for r in runs} == {x["device"] for x in lat} == {"cpu"}
    page = (tmp_path / "benchmarks_224.md").read_text()
    assert "## Pruning" in page and "## Latency of the pruned models" in page
    assert page.count("| `recon.models:digits_") == len(runs) + len(lat)
    assert "Run on `cpu`." in page
    # where the time goes: every operator group, original and pruned, in both formats
    ops = out["scale224"]["operators"]
    assert {(o["model"].split(":")[1], o["format"]) for o in ops} == {
        (m, f) for m in ("digits_vgg", "digits_resnet20") for f in ("contiguous", "channels_last")
    }
    conv = [o for o in ops if o["group"] == "conv"]
    assert all(o["original_ms"] > 0 and o["pruned_ms"] > 0 for o in conv)
    assert "## Where the time goes" in page and page.count("| conv | ") == 2


def test_bench_script_all_can_skip_the_224px_part(script, tmp_path, monkeypatch):
    called = []
    for name in ("compare", "scale", "latency", "scale224"):
        monkeypatch.setattr(script, name, lambda args, name=name: called.append(name) or {})
    monkeypatch.setattr(script, "markdown", lambda *a: "page")
    out = tmp_path / "benchmarks.md"
    script.main(["all", "--skip-224", "--out", str(out)])
    assert called == ["compare", "scale", "latency"] and out.read_text() == "page"
    assert not (tmp_path / "benchmarks_224.md").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_run.sh)")
def test_bench_scale224_on_cuda(script, tmp_path):
    out = script.main(["scale224", "--quick", "--in-process", "--device", "cuda"])
    runs, lat = out["scale224"]["runs"], out["scale224"]["latency"]
    assert runs and all(r["device"].startswith("cuda") for r in runs)
    assert lat and all(x["device"].startswith("cuda") for x in lat)
    for r in runs:
        assert r["flops_ratio"] == pytest.approx(2.0, rel=0.02)


@pytest.mark.slow  # 11 s of process start-up; the comparison itself runs in test_..._all_...
def test_bench_script_compare_in_child_processes(script, tmp_path):
    """The default path: each side in its own process, same channels, JSON written."""
    path = tmp_path / "out.json"
    script.main(["compare", "--quick", "--threads", "1", "--json", str(path)])
    c = json.loads(path.read_text())["compare"]
    assert c["recon"]["kept"] == c["naive"]["kept"]
    assert c["recon"]["peak_rss"] > 0 and c["naive"]["peak_rss"] > 0
    assert c["recon"]["side"] == "recon" and c["naive"]["side"] == "naive"


def test_naive_reference_leaves_autograd_on(script):
    """The in-process naive run must not switch gradients off for the rest of the process."""
    torch.manual_seed(0)
    net = digits_vgg(width=0.125).eval()
    out = script._naive.prune_naive(net, torch.randn(16, 1, 8, 8), speedup=1.5)
    assert out["kept"] and torch.is_grad_enabled()


def test_bench_scale224_can_skip_the_latency(script):
    out = script.main(
        ["scale224", "--quick", "--in-process", "--allocations", "uniform", "--skip-latency"]
    )
    runs = out["scale224"]["runs"]
    assert [r["allocation"] for r in runs] == ["uniform", "uniform"]  # one per model
    assert out["scale224"]["latency"] == [] and out["scale224"]["operators"] == []
