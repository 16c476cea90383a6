"""``scripts/bench.py methods``: recon's default beside LASSO, merged into a page.
Correctness only: no timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
pytestmark = pytest.mark.filterwarnings("ignore:re-fitting:UserWarning")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("_script_bench_methods", SCRIPTS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_methods_rows_are_merged_into_the_page(script, tmp_path):
    before = torch.get_num_threads()
    page = tmp_path / "page.md"
    page.write_text("# Page\n\nkept as it was\n", encoding="utf-8")
    try:
        out = script.main(
            ["methods", "--quick", "--in-process", "--threads", "1", "--out", str(page)]
        )
    finally:
        torch.set_num_threads(before)
    runs = out["methods"]
    assert [(r["model"].split(":")[1], r["method"]) for r in runs] == [
        (m, a) for m in ("digits_vgg", "digits_resnet20") for a in ("obs", "lasso")
    ]
    for r in runs:
        assert r["config"]["reconstruct"] == "lstsq" and r["config"]["method"] == r["method"]
        assert {"select", "solve", "forward", "stats"} <= set(r["phases"])
        assert r["flops_ratio"] == pytest.approx(2.0, rel=0.05)
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# Page\n\nkept as it was\n")
    assert text.count(script.METHODS_START) == 1 and text.count("| `recon.models:digits_") == 4
    assert "python scripts/bench.py methods --quick" in text
    # a rerun replaces the section and keeps the rest
    script.merge_section(page, f"{script.METHODS_START}\nnew\n{script.METHODS_END}\n")
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# Page\n\nkept as it was\n") and "new" in text
    assert text.count(script.METHODS_START) == 1 and "digits_vgg" not in text
