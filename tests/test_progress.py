"""Progress output: a tqdm bar at a terminal; plain lines, one per layer, in a log.

Under pytest, stderr is captured (not a terminal), which is the log case; the terminal
case is a stream whose ``isatty()`` says True.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import torch
from nets import bright_pixels
from tqdm.std import tqdm as std_tqdm

import recon
from recon._progress import LineProgress, progress_bar
from recon.finetune import finetune
from recon.graph import find_units
from recon.models import digits_vgg


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _model(width: float = 0.25):
    torch.manual_seed(0)
    return digits_vgg(width=width).eval()


CALIB = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_lines_off_a_terminal():
    out = io.StringIO()
    bar = progress_bar(["a", "b", "c"], desc="recon", unit="layer", file=out)
    assert isinstance(bar, LineProgress)
    for item in bar:
        bar.set_postfix_str(f"{item} 8->4")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("recon 1/3 layers: a 8->4 (")
    assert lines[2].startswith("recon 3/3 layers: c 8->4 (") and lines[2].endswith(" s in all)")

    out = io.StringIO()
    bar = progress_bar(range(5), desc="fine-tuning", unit="step", log="end", file=out)
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}")
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().strip()]  # one line
    assert out.getvalue().startswith("fine-tuning: 5/5 steps, loss=0.20 (")

    out = io.StringIO()
    assert list(progress_bar(iter("xy"), desc="inner", log="none", file=out)) == ["x", "y"]
    assert out.getvalue() == ""


def test_write_puts_a_line_between_progress_lines():
    out = io.StringIO()
    bar = progress_bar(["a", "b"], desc="runs", unit="run", file=out)
    for item in bar:
        bar.write(f"result of {item}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "result of a" and lines[1].startswith("runs 1/2 runs")
    assert lines[2] == "result of b" and lines[3].startswith("runs 2/2 runs")


def test_disable_shows_nothing_anywhere():
    for stream in (io.StringIO(), _Terminal()):
        bar = progress_bar(range(3), desc="recon", disable=True, file=stream)
        for _ in bar:
            bar.set_postfix_str("x")
        bar.close()
        assert stream.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    term = _Terminal()
    bar = progress_bar(range(3), desc="recon", unit="layer", file=term)
    assert isinstance(bar, std_tqdm)
    assert list(bar) == [0, 1, 2]
    assert "recon" in term.getvalue() and "\r" in term.getvalue()


def test_bad_log_is_refused():
    with pytest.raises(ValueError, match="'log' argument"):
        progress_bar(range(2), log="every")


def test_prune_logs_one_line_per_pruned_layer(capsys):
    model = _model()
    result = recon.prune(model, CALIB, speedup=2.0, progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    found = find_units(model).units
    units = [u.name for u in found]
    pruned = [u.name for u in found if result.channels[u.name] < u.width]
    assert "\r" not in err  # no bar redraws
    profile, lines = lines[: len(units)], lines[len(units) :]  # allocation="auto" first
    for i, (line, name) in enumerate(zip(profile, units, strict=True), 1):
        assert line.startswith(f"profile {i}/{len(units)} layers: {name} "), line
    assert len(lines) == len(pruned)
    for i, (line, name) in enumerate(zip(lines, pruned, strict=True), 1):
        assert line.startswith(f"recon {i}/{len(pruned)} layers: {name} "), line

    recon.prune(model, CALIB, speedup=2.0, progress=False)
    assert capsys.readouterr().err == ""


def test_finetune_logs_one_line(capsys):
    x, y = bright_pixels(32)
    finetune(_model(), x, y, steps=3, batch_size=8, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fine-tuning: 3/3 steps, loss=")


def test_cli_log_holds_a_line_per_layer_and_the_report(tmp_path):
    """`recon prune > log 2>&1`: no bars in the file."""
    torch.save(_model(width=1.0).state_dict(), tmp_path / "w.pt")  # what the CLI builds
    torch.save(CALIB, tmp_path / "x.pt")
    args = ["prune", "--model", "recon.models:digits_vgg", "--weights", str(tmp_path / "w.pt")]
    args += ["--data", str(tmp_path / "x.pt"), "--speedup", "2", "--out", str(tmp_path / "o.pt")]
    log = tmp_path / "log"
    with open(log, "w") as f:
        run = subprocess.run(
            [sys.executable, "-m", "recon", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
            check=False,
        )
    text = log.read_text()
    assert run.returncode == 0, text[-3000:]
    assert "\r" not in text
    layer_lines = [line for line in text.splitlines() if re.match(r"recon \d+/\d+ layers: ", line)]
    n = len(layer_lines)
    assert n > 0 and all(
        line.startswith(f"recon {i}/{n} ") for i, line in enumerate(layer_lines, 1)
    )
    assert "pruned model written to" in text
    assert len(text.splitlines()) < 60, text  # not hundreds of redrawn bars
