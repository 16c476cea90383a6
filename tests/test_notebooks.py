"""The notebooks in notebooks/ run from top to bottom, from a clean state, and are stored
with the outputs of their current code (made by scripts/run_notebooks.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

nbformat = pytest.importorskip("nbformat")


def _runner():
    """scripts/run_notebooks.py, which stores and defines the code hash."""
    path = ROOT / "scripts" / "run_notebooks.py"
    spec = importlib.util.spec_from_file_location("_script_run_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_with_the_outputs_of_its_code(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    runner = _runner()
    rerun = f"run `python scripts/run_notebooks.py notebooks/{path.name}` and commit the result"
    recorded = runner.recorded_hash(nb)
    assert recorded is not None, f"{path.name} was never run by scripts/run_notebooks.py: {rerun}"
    assert recorded == runner.code_hash(nb), (
        f"{path.name} is stale: its code cells changed since its outputs were made; {rerun}"
    )
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not run top to bottom"
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"cell {i} of {path.name} stored an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [
        (i, out.get("ename"), out.get("evalue"))
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors, errors


def test_run_notebooks_stores_outputs_and_the_code_hash(tmp_path):
    pytest.importorskip("nbclient")
    runner = _runner()
    path = tmp_path / "tiny.ipynb"
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": kernelspec})
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"), nbformat.v4.new_code_cell("print(1 + 1)")]
    nbformat.write(nb, path)
    assert runner.main(["--check", str(path)]) == 1  # never run
    assert runner.main([str(path)]) == 0
    done = nbformat.read(path, as_version=4)
    cell = done.cells[1]
    assert cell.execution_count == 1 and cell.outputs[0].text == "2\n"
    assert "execution" not in cell.metadata  # no timestamps: reruns change only what changed
    assert runner.recorded_hash(done) == runner.code_hash(done)
    assert runner.main(["--check", str(path)]) == 0
    done.cells[1].source = "print(1 + 2)"
    nbformat.write(done, path)
    assert runner.main(["--check", str(path)]) == 1  # stale
