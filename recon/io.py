"""Saving and loading pruned models: the plan and the weights in one safe file.

A pruned model's layers no longer have the shapes its class builds, so its
``state_dict`` alone cannot be loaded back. :func:`save` writes the pruning plan (see
:func:`recon.apply_plan`) next to the pruned ``state_dict``; :func:`load` builds the
unpruned architecture with the caller's ``model_factory``, replays the plan's surgery
and loads the weights. The file is an ordinary ``torch.save`` archive of plain data::

    {"format": "recon", "format_version": 1,
     "plan": {...},                        # strings, numbers, lists, dicts
     "state_dict": {"features.0.weight": Tensor, ...}}

so ``torch.load(path, weights_only=True)`` reads it: no pickled classes, no code runs
on loading. Files are written atomically (a temporary file in the same folder, then
``os.replace``): an interrupted save never leaves a half-written file where a good one
was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._plan import PLAN_VERSION, apply_plan, check_plan, plan_of
from ._version import __version__
from .api import PruneResult

__all__ = ["FILE_FORMAT", "FILE_VERSION", "load", "save"]

FILE_FORMAT = "recon"
#: Version of the file layout; bumped when a reader of the old layout would misread it.
FILE_VERSION = 1


def _check_path(path: Any) -> str:
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"The 'path' argument must be a str or os.PathLike. Got {type(path).__name__} instead."
        )
    return os.fspath(path)


def save(result: PruneResult | nn.Module, path: str | os.PathLike) -> None:
    """Write a pruned model (its plan and weights) to ``path``, atomically.

    Parameters
    ----------
    result : PruneResult or nn.Module
        What :func:`recon.prune` returned, or a model that carries a plan (a pruned,
        loaded or :func:`recon.apply_plan`-reshaped model, e.g. after fine-tuning).
    path : str or os.PathLike
        The file to write. An existing file is replaced only once the new one is
        complete; the folder must exist.

    Raises
    ------
    TypeError
        If ``result`` is neither, or ``path`` is not a path.
    ValueError
        If ``result`` carries no plan, or ``path`` is a folder.

    Notes
    -----
    The weights are saved on the CPU, in the model's dtypes. Read the file back with
    :func:`load`; ``torch.load(path, weights_only=True)`` also reads it (a dict of the
    plan and the ``state_dict``).

    Examples
    --------
    >>> import os, tempfile, torch, recon
    >>> from recon.models import vgg11
    >>> net = vgg11(width=0.125).eval()
    >>> result = recon.prune(net, torch.randn(128, 3, 32, 32), keep_ratio=0.5, progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "vgg11_pruned.pt")
    >>> recon.save(result, path)
    >>> model = recon.load(path, lambda: vgg11(width=0.125)).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.equal(model(x), result.model(x))
    True
    """
    if isinstance(result, PruneResult):
        model, plan = result.model, result.plan
    elif isinstance(result, nn.Module):
        model, plan = result, plan_of(result)
    else:
        raise TypeError(
            "The 'result' argument must be a recon.PruneResult or a pruned nn.Module. "
            f"Got {type(result).__name__} instead."
        )
    path = _check_path(path)
    if not plan:
        raise ValueError(
            "The 'result' argument carries no pruning plan: save what recon.prune, "
            "recon.load or recon.apply_plan returned."
        )
    plan = check_plan(plan, "The 'result' argument's plan")
    if os.path.isdir(path):
        raise ValueError(f"The 'path' argument must name a file. Got the folder '{path}'.")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FILE_FORMAT,
        "format_version": FILE_VERSION,
        "recon_version": __version__,
        "plan": plan,
        "state_dict": state,
    }
    _write_atomic(payload, path)


def _write_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically: written to a temporary file in the same
    folder (permissions as a new file's: 0666 less the umask), synced, then renamed over
    ``path``, so a reader never sees a half file and a failure leaves ``path`` as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not possible everywhere
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load(
    path: str | os.PathLike, model_factory: Callable[[], nn.Module], *, strict: bool = True
) -> nn.Module:
    """Rebuild a model saved with :func:`save`.

    Calls ``model_factory()`` for the unpruned architecture, applies the file's plan
    (:func:`recon.apply_plan`) and loads the saved weights. The result computes the same
    outputs as the saved model (put it in ``eval()`` mode for inference: the factory's
    train/eval mode is kept, as ``load_state_dict`` does).

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save`.
    model_factory : callable
        Called with no arguments, returns the *unpruned* model the plan was made for
        (the same class and constructor arguments as the model given to
        :func:`recon.prune`), on the device where the loaded model should live.
    strict : bool, default True
        Passed to ``load_state_dict``: whether the saved weights must name exactly the
        model's parameters and buffers.

    Returns
    -------
    nn.Module
        The pruned model, in the saved dtype; it carries the plan, so it can be pruned
        again or saved again.

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If the file is damaged, not written by :func:`save`, of a newer format, or does
        not fit the model ``model_factory`` builds; the message names the file and what
        does not match.
    TypeError
        If ``model_factory`` is not a callable that returns an ``nn.Module``.
    """
    path = _check_path(path)
    if isinstance(model_factory, nn.Module) or not callable(model_factory):
        raise TypeError(
            "The 'model_factory' argument must be a function that builds the unpruned "
            f"model (e.g. lambda: vgg11()). Got {type(model_factory).__name__} instead."
        )
    if not isinstance(strict, bool):
        raise TypeError(f"The 'strict' argument must be a bool. Got {strict!r} instead.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The 'path' argument names no file: '{path}'.")
    return rebuild(_read(path), path, model_factory, strict=strict)


def is_recon_file(payload: Any) -> bool:
    """Whether ``payload`` (what ``torch.load`` returned) is the content of a recon file."""
    return isinstance(payload, dict) and payload.get("format") == FILE_FORMAT


def _read(path: str) -> Any:
    """``torch.load(path, weights_only=True)``, or a ValueError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"'{path}' cannot be read as a recon file (torch.load(weights_only=True) failed: "
            f"{type(exc).__name__}: {first}). It is damaged or truncated, or was not written "
            "by recon.save."
        ) from exc


def rebuild(
    payload: Any,
    path: str,
    model_factory: Callable[[], nn.Module],
    *,
    strict: bool = True,
    built: str = "the model that model_factory built",
) -> nn.Module:
    """The model of a recon file's ``payload`` (already read from ``path``); see :func:`load`.

    ``built`` says in error messages where the unpruned model came from (the command
    line names its ``--model``).
    """
    state = _check_payload(payload, path)
    plan = check_plan(payload["plan"], f"The plan in '{path}'")
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            "The 'model_factory' argument must return a torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    try:
        model = apply_plan(model, plan, inplace=True)
    except ValueError as exc:
        raise ValueError(f"'{path}' does not fit {built}: {exc}") from exc
    _check_state(model, state, path, strict, built)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    ours = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1 and ours and ours != dtypes:
        model.to(dtypes.pop())  # e.g. a float16 model saved, a float32 one built
    model.load_state_dict(state, strict=strict)
    return model


def _check_payload(payload: Any, path: str) -> dict[str, Tensor]:
    """The state_dict of a file's payload, or a ValueError naming what is wrong."""
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        got = (
            f"a dict with keys {sorted(map(str, payload))[:6]}"
            if isinstance(payload, dict)
            else f"a {type(payload).__name__}"
        )
        raise ValueError(
            f"'{path}' is not a file written by recon.save: expected a dict with "
            f"'format' = {FILE_FORMAT!r}, got {got}. (A plain state_dict cannot be loaded "
            "into a pruned model: its shapes need the plan.)"
        )
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"'{path}' has an invalid 'format_version': {version!r}.")
    if version > FILE_VERSION:
        raise ValueError(
            f"'{path}' is a recon file of format version {version}, newer than this recon "
            f"({__version__}, file version {FILE_VERSION}, plan version {PLAN_VERSION}) "
            "reads; upgrade recon to load it."
        )
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"'{path}' has no valid 'state_dict' (a dict of name to tensor).")
    if "plan" not in payload:
        raise ValueError(f"'{path}' has no 'plan'.")
    return state


def _check_state(
    model: nn.Module, state: dict[str, Tensor], path: str, strict: bool, built: str
) -> None:
    """A ValueError naming the file and the weights that do not fit the reshaped model."""
    ours = model.state_dict()
    wrong = [
        f"'{k}' is {tuple(v.shape)} in the file, {tuple(ours[k].shape)} in the model"
        for k, v in state.items()
        if k in ours and v.shape != ours[k].shape
    ]
    if strict:
        missing = [k for k in ours if k not in state]
        unexpected = [k for k in state if k not in ours]
        if missing:
            wrong.append(f"the file has no {_names(missing)}")
        if unexpected:
            wrong.append(f"the model has no {_names(unexpected)}")
    for k, v in state.items():  # the sampler indices are the plan's, in the file too
        if k.endswith("sampler.index") and k in ours and v.shape == ours[k].shape:
            if not torch.equal(v.to(ours[k].device), ours[k]):
                wrong.append(f"'{k}' in the file differs from the plan's sampler indices")
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise ValueError(
            f"'{path}' does not fit {built}, reshaped by the file's plan: "
            f"{'; '.join(wrong[:5])}{more}."
        )


def _names(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
