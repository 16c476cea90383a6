"""Execute the notebooks in notebooks/ in place, so that they are stored with their outputs.

A reader browsing the repository sees each walkthrough's printed results, tables and
figures without installing anything. Each notebook runs top to bottom in a fresh
``python3`` kernel, with the repository root as working directory, and is written back
with its outputs and, in its metadata (``metadata.recon``), the sha256 of its code cells
and the versions it ran with. tests/test_notebooks.py compares that hash with the code
cells as they are now: a notebook whose code changed since its outputs were made fails
there, with a message to run this script. (The same tests also execute every notebook
from a clean state, so a notebook whose code still works but whose stored outputs come
from an older recon is only as stale as the last run of this script: rerun it when
recon's defaults change.)

    python scripts/run_notebooks.py                                # every notebook
    python scripts/run_notebooks.py notebooks/01_quickstart.ipynb  # one
    python scripts/run_notebooks.py --check                        # which ones are stale

Figures are stored as PNGs at 72 dpi (``DPI``), a few tens of kB each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
#: Where a notebook's record lives: ``nb.metadata[METADATA_KEY]``.
METADATA_KEY = "recon"
#: Resolution of the stored figures (matplotlib's default is 100).
DPI = 72


def code_hash(nb: Any) -> str:
    """sha256 of a notebook's code cells, in order (what its outputs were made from)."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def recorded_hash(nb: Any) -> str | None:
    """The code hash stored when the notebook was last run by this script (None if never)."""
    return nb.metadata.get(METADATA_KEY, {}).get("code_sha256")


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import recon

    return {
        "python": platform.python_version(),
        "recon": recon.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


def run(path: Path, timeout: int = 600) -> float:
    """Execute ``path`` in place, keeping outputs; returns the seconds it took."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # no leftovers from an earlier run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
        record_timing=False,  # no per-cell timestamps: a rerun changes only what changed
    )
    with tempfile.TemporaryDirectory() as rc:
        Path(rc, "matplotlibrc").write_text(f"figure.dpi: {DPI}\n")  # small stored PNGs
        env = {**os.environ, "MATPLOTLIBRC": rc}
        t0 = time.perf_counter()
        client.execute(env=env)  # raises CellExecutionError, naming the cell, at a failure
        seconds = time.perf_counter() - t0
    nb.metadata[METADATA_KEY] = {"code_sha256": code_hash(nb), "executed_with": _versions()}
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebooks",
        nargs="*",
        type=Path,
        help="notebooks to run (default: every notebooks/*.ipynb)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="run nothing; list the notebooks whose code changed since they were run "
        "(exit status 1 if any)",
    )
    parser.add_argument(
        "--timeout", type=int, default=600, help="seconds allowed per cell (default 600)"
    )
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    if not paths:
        parser.error(f"no notebooks found in {NOTEBOOKS}")
    if args.check:
        import nbformat

        notebooks = {p: nbformat.read(p, as_version=4) for p in paths}
        stale = [p for p, nb in notebooks.items() if recorded_hash(nb) != code_hash(nb)]
        for p in stale:
            print(f"stale: {p}")
        return 1 if stale else 0
    for p in paths:
        print(f"running {p} ...", flush=True)
        seconds = run(p, timeout=args.timeout)
        size = p.stat().st_size
        print(f"  done in {seconds:.0f} s, {size / 1024:.0f} kB written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
