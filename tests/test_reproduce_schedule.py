"""scripts/reproduce.py --schedule iterative:K and --allocations scan, in --quick mode on
the shipped ``vgg16_fmnist``: rows, tables, resume."""

from __future__ import annotations

import json

import pytest
import torch
from test_scripts import _load

from recon.models import pretrained_names

pytestmark = pytest.mark.skipif(
    "vgg16_fmnist" not in pretrained_names(), reason="vgg16_fmnist is not shipped"
)
QUICK = ["--quick", "--models", "vgg16_fmnist", "--methods", "obs", "--reconstruct", "lstsq"]
QUICK += ["--calib", "64", "--n-test", "200", "--ft-steps", "4"]


@pytest.fixture(scope="module")
def reproduce():
    from recon.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return _load("reproduce")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # 20 s: two runs of the VGG-16 (pruning twice in the second)
def test_iterative_schedule_rows_table_and_resume(reproduce, tmp_path):
    argv = [*QUICK, "--schedule", "oneshot,iterative:2", "--out-dir", str(tmp_path)]
    assert reproduce.main(argv) == 0
    rows = _rows(tmp_path / "results.jsonl")
    assert [r.get("schedule", "oneshot") for r in rows] == ["oneshot", "iterative:2"]
    _, two = rows
    assert two["acc"] is None and 0 <= two["acc_ft"] <= 1
    assert [r["finetune_steps"] for r in two["rounds"]] == [2, 2]
    assert abs(two["speedup"] / 2.0 - 1) <= 0.02
    assert not (tmp_path / ".iterative").exists()  # the checkpoints go once the row is written
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert f"| obs | lstsq | uniform · iterative:2 | – / {100 * two['acc_ft']:.2f}% |" in md
    assert "- Schedules: oneshot, iterative:2." in md
    # --resume: both rows are there, nothing is pruned again
    reproduce.recon.prune, prune = None, reproduce.recon.prune
    try:
        assert reproduce.main([*argv, "--resume"]) == 0
    finally:
        reproduce.recon.prune = prune
    assert _rows(tmp_path / "results.jsonl") == rows


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--schedule", "iterative:0"], "--schedule: must be a comma-separated list"),
        (["--schedule", "twice"], "--schedule: must be a comma-separated list"),
        (["--allocations", "scan", "--schedule", "iterative:2"], "scan applies to --schedule"),
        (["--scan-ratios", "1.5"], "--scan-ratios"),
    ],
)
def test_bad_schedule_options(reproduce, argv, match, capsys):
    with pytest.raises(SystemExit):
        reproduce.main([*QUICK, *argv])
    assert match in capsys.readouterr().err


@pytest.mark.slow  # 30 s: a sensitivity scan of the 13 units of the VGG-16
def test_scan_allocation_rows_and_cached_scan(reproduce, tmp_path):
    argv = [*QUICK, "--allocations", "uniform,scan", "--scan-ratios", "0.5"]
    argv += ["--scan-val", "100", "--out-dir", str(tmp_path)]
    assert reproduce.main(argv) == 0
    uniform, scan = _rows(tmp_path / "results.jsonl")
    assert scan["allocation"] == "scan" and isinstance(scan["sensitive"], list)
    assert abs(scan["speedup"] / 2.0 - 1) <= 0.02
    saved = json.loads((tmp_path / "scan_vgg16_fmnist.json").read_text(encoding="utf-8"))
    assert saved["scan"]["ratios"] == [0.5] and (tmp_path / "scan_vgg16_fmnist.png").exists()
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "Allocation `scan` (vgg16_fmnist)" in md and "scan_vgg16_fmnist.png" in md
    # the cached scan is read back, not made again
    (tmp_path / "results.jsonl").write_text(json.dumps(uniform) + "\n", encoding="utf-8")
    reproduce.recon.sensitivity_scan = None
    try:
        assert reproduce.main([*argv, "--resume"]) == 0
    finally:
        del reproduce.recon.sensitivity_scan
    assert _rows(tmp_path / "results.jsonl")[1]["channels"] == scan["channels"]
