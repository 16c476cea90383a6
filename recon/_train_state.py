"""A training run's state on disk, so that an interrupted :func:`recon.finetune` resumes.

The file holds what the next step depends on: the model's parameters and buffers, the
optimiser's momentum, the schedule's position, the batch order and the generators.
Resumed from it, training continues exactly as it would have without the interruption.
It also records the arguments of the run that wrote it (its *signature*), so that a
file written by another run is refused instead of silently continued.

Files are written atomically (as :func:`recon.save` writes its files) and read with
``torch.load(weights_only=True)``: loading one runs no code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_path", "load", "save"]

FORMAT = 1  # bumped when the file's layout changes


def check_path(path: Any) -> Path:
    """The ``checkpoint`` argument as a Path, or an error naming it."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            "The 'checkpoint' argument must be a path (str or os.PathLike) or None. Got "
            f"{type(path).__name__} instead."
        )
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"The 'checkpoint' argument must be a file path. Got the folder {path}.")
    return path


def save(path: Path, signature: dict[str, Any], state: dict[str, Any]) -> None:
    """Write ``state`` with ``signature`` to ``path`` (its folder made if need be),
    atomically (:func:`recon.io._write_atomic`)."""
    from .io import _write_atomic  # lazily: recon.io imports the pruning API

    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic({"format": FORMAT, "signature": signature, **state}, os.fspath(path))


def load(path: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The state saved at ``path`` (None if there is no file), checked against ``signature``.

    Raises ``ValueError`` naming the first differing argument if the file was written
    by a run with other arguments, or if it is not a training-state file.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not pickle's words
        raise ValueError(
            f"The 'checkpoint' file {path} is not a recon training state ({err}). Delete "
            "it to start over."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"The 'checkpoint' file {path} is not a recon training state (format "
            f"{FORMAT}). Delete it to start over."
        )
    saved = state["signature"]
    for key in sorted(set(signature) | set(saved)):
        if saved.get(key) != signature.get(key):
            if key == "shapes":
                raise ValueError(
                    f"The 'checkpoint' file {path} was written by another run: its model "
                    "has other parameters or shapes. Delete it (or pass another path) to "
                    "start over."
                )
            raise ValueError(
                f"The 'checkpoint' file {path} was written by another run: its {key} is "
                f"{saved.get(key)!r}, this run's is {signature.get(key)!r}. Delete it (or "
                "pass another path) to start over."
            )
    return state
