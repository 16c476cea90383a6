"""The files a user names on the command line (models, weights, calibration data), safely.

Safe by default: every file is read with ``torch.load(weights_only=True)`` or
``np.load(allow_pickle=False)``, which build tensors and plain containers only and run
no code from the file. A file that holds other pickled Python objects (a whole saved
module, a checkpoint with an ``argparse.Namespace`` in it, a NumPy object array) is
refused with :class:`PickleRefusedError`, which names the file, the object it refers to
and how to proceed, unless the caller passes ``unsafe_pickle=True`` (the CLI's
``--unsafe-pickle``): unpickling such a file runs whatever code its author chose.

Model specs (``--model``)::

    pretrained:NAME              a model shipped with recon (recon.models.pretrained_names())
    torchvision:NAME             torchvision.models.get_model(NAME)
    package.module:factory       a callable returning an nn.Module
    FILE                         a whole pickled module: only with unsafe_pickle=True

``--weights`` is a ``state_dict`` file, a recon file (:func:`recon.save`: its plan is
applied to the model before its weights are loaded, as :func:`recon.load` does), or for
``torchvision:NAME`` a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``).
"""

from __future__ import annotations

import importlib
import os
import pickle
import pickletools
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import io as _io

__all__ = [
    "BUILTIN_DATA",
    "MODEL_SPECS",
    "PickleRefusedError",
    "load_data",
    "load_model",
    "read_torch_file",
    "torchvision_weights_name",
]

BUILTIN_DATA = ("fmnist", "digits")
MODEL_SPECS = "torchvision:NAME, package.module:factory or pretrained:NAME"
_UNSAFE_FLAG = "--unsafe-pickle"


class PickleRefusedError(ValueError):
    """A file holds pickled Python objects, which are loaded only when asked explicitly."""


def _first_line(exc: BaseException, limit: int = 300) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def read_torch_file(path: str, what: str, *, unsafe_pickle: bool = False, advice: str = "") -> Any:
    """``torch.load`` of the file ``path``, named ``what`` in errors (e.g. ``'--weights'``).

    With ``unsafe_pickle=False`` the file is read with ``weights_only=True``; a file
    that refers to any other Python object raises :class:`PickleRefusedError` naming
    the file, the object and ``advice`` (what to do instead), and no code from the
    file runs. With ``unsafe_pickle=True`` it is read with ``weights_only=False``.
    Any other failure raises ``ValueError`` naming the file.
    """
    try:
        with warnings.catch_warnings():  # our own message says what is wrong
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        refers = found[1] if found else None
        if refers is None and not unsafe_pickle and "Weights only load failed" in text:
            refers = _pickle_refers(path)  # e.g. a plain pickle of protocol 4
        if unsafe_pickle or refers is None:
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            raise ValueError(
                f"The {what} file '{path}' cannot be read by torch.load (UnpicklingError: "
                f"{reason[1] if reason else _first_line(exc)}): it is damaged, or not a file "
                "written by torch.save."
            ) from None
        named = f" (it refers to {refers})" if refers else ""
        raise PickleRefusedError(
            f"The {what} file '{path}' holds pickled Python objects{named}, which recon "
            "does not load by default: unpickling runs code chosen by whoever made the "
            f"file. If you trust the file, add {_UNSAFE_FLAG}.{advice}"
        ) from None  # torch's message recommends weights_only=False; ours says when
    except Exception as exc:
        raise ValueError(
            f"The {what} file '{path}' cannot be read by torch.load ({type(exc).__name__}: "
            f"{_first_line(exc)}): it is damaged, or not a file written by torch.save."
        ) from exc


_OBJECT_OPS = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "BUILD"})
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})


def _pickle_refers(path: str) -> str | None:
    """For a file that is a plain pickle building Python objects: the first global it
    names (``""`` if none can be told); None if it is not a readable pickle or builds
    no objects. Parses the opcodes only (``pickletools.genops``): nothing is executed.
    """
    strings: list[str] = []
    objects = False
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return ".".join(strings[-2:])
                objects = objects or op.name in _OBJECT_OPS
                if op.name in _STRING_OPS:
                    strings.append(str(arg))
                elif op.name != "MEMOIZE":
                    strings.clear()  # only strings pushed just before STACK_GLOBAL count
    except Exception:
        return None
    return "" if objects else None


# --------------------------------------------------------------------------- models


def load_model(spec: str, weights: str | None = None, *, unsafe_pickle: bool = False) -> nn.Module:
    """Build or load the model named by ``spec`` and load ``weights`` into it (eval mode).

    See the module docstring for the specs. Raises ``ValueError`` (or
    :class:`PickleRefusedError`) naming the argument and the file on bad input.
    """
    tv_weights = None
    if os.path.isfile(spec):
        model = _model_file(spec, unsafe_pickle)
    elif os.path.isdir(spec):
        raise ValueError(
            f"The '--model' must be {MODEL_SPECS} or a file. Got the folder '{spec}' instead."
        )
    elif spec.startswith("pretrained:"):
        from .models import pretrained

        model = pretrained(spec.split(":", 1)[1])
    elif spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        tv_weights = torchvision_weights_name(spec, weights)
        model = _torchvision_model(name, tv_weights)
    elif ":" in spec:
        model = _factory_model(spec)
    else:
        raise ValueError(
            f"The '--model' spec must be {MODEL_SPECS} or an existing file. Got {spec!r} instead."
        )
    if weights is not None and tv_weights is None:
        model = _load_weights(model, spec, weights, unsafe_pickle)
    return model.eval()


def torchvision_weights_name(spec: str, weights: str | None) -> str | None:
    """``weights`` if it names torchvision weights of the ``torchvision:NAME`` spec, else None.

    A ``weights`` that is an existing file is a file; one that looks like a path
    (a folder separator, or a ``.pt``/``.pth``/``.bin``/``.safetensors`` suffix) but does
    not exist is an error naming it; anything else must be a weights name of the model.
    """
    if weights is None or not spec.startswith("torchvision:") or os.path.exists(weights):
        return None
    if os.sep in weights or "/" in weights or Path(weights).suffix in _FILE_SUFFIXES:
        raise ValueError(f"The '--weights' file '{weights}' does not exist.")
    from .images import torchvision_weights

    torchvision_weights(spec.split(":", 1)[1], weights)  # a ValueError listing the names
    return weights


_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")


def _torchvision_model(name: str, weights: str | None) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ValueError(
            "The '--model' spec torchvision:NAME needs torchvision, which comes with "
            "recon's 'vision' extra: pip install 'recon[vision]'"
        ) from exc
    if name not in torchvision.models.list_models():
        raise ValueError(f"The '--model' spec must name a torchvision model. Got {name!r} instead.")
    return torchvision.models.get_model(name, weights=weights)


def _factory_model(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"The '--model' spec must be 'package.module:factory'. Could not load {spec!r} ({exc})."
        ) from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"The '--model' factory {spec!r} returned {type(model).__name__}.")
    return model


def _model_file(path: str, unsafe_pickle: bool) -> nn.Module:
    """The whole module pickled in ``path`` (only with ``unsafe_pickle``)."""
    obj = read_torch_file(
        path,
        "'--model'",
        unsafe_pickle=unsafe_pickle,
        advice=" Otherwise, where you trust it, save its weights instead "
        "(torch.save(model.state_dict(), 'weights.pt') or recon.save) and give "
        f"--model {MODEL_SPECS} with --weights weights.pt.",
    )
    if isinstance(obj, nn.Module):
        return obj
    if _io.is_recon_file(obj):
        kind = "a recon file (a pruning plan and weights)"
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        kind = "a state_dict"
    else:
        raise ValueError(
            f"The '--model' file '{path}' must hold a whole nn.Module. "
            f"Got {type(obj).__name__} instead."
        )
    raise ValueError(
        f"The '--model' file '{path}' holds {kind}, not a model: give the unpruned "
        f"architecture with --model ({MODEL_SPECS}) and this file with --weights."
    )


def _load_weights(model: nn.Module, spec: str, path: str, unsafe_pickle: bool) -> nn.Module:
    """``model`` with the weights of the file ``path`` (a recon file's plan applied first)."""
    if not os.path.isfile(path):
        raise ValueError(f"The '--weights' file '{path}' does not exist.")
    obj = read_torch_file(
        path,
        "'--weights'",
        unsafe_pickle=unsafe_pickle,
        advice=" Otherwise, where you trust it, save only the weights "
        "(torch.save(model.state_dict(), path), or recon.save for a pruned model).",
    )
    built = f"the model of --model {spec!r}"
    if _io.is_recon_file(obj):
        return _io.rebuild(obj, path, lambda: model, built=built)
    state = _state_dict_of(obj, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 600 else detail[:600] + " ..."
        hint = (
            " (A pruned model's weights need its plan: save it with recon.save, or write it "
            "with recon prune --out.)"
            if "size mismatch" in detail
            else ""
        )
        raise ValueError(
            f"The '--weights' file '{path}' does not fit {built}: {detail}{hint}"
        ) from None
    return model


def _state_dict_of(obj: Any, path: str) -> dict[str, Tensor]:
    """The state_dict in a weights file: the dict itself, or a checkpoint's entry."""
    if isinstance(obj, nn.Module):  # only read with unsafe_pickle
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, dict):
                obj = inner
                break
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return obj
    raise ValueError(
        f"The '--weights' file '{path}' must hold a state_dict (a dict of names to tensors), "
        "a checkpoint dict with a 'state_dict' or 'model' entry, or a recon file. Got "
        f"{type(obj).__name__} instead."
    )


# --------------------------------------------------------------------------- data


def load_data(spec: str, *, unsafe_pickle: bool = False) -> tuple[Tensor, Tensor | None]:
    """Calibration inputs (and labels, if the source has them) of a built-in set or a file.

    ``spec`` is ``fmnist``, ``digits``, a ``.npy`` array or a ``torch.save`` file (a
    tensor ``(N, C, H, W)``, an ``(inputs, labels)`` pair or a dict with ``'inputs'``).
    Folders of images are read by :class:`recon.images.ImageFolderBatches`.
    """
    if spec == "fmnist":
        from .data import load_embedded

        x_calib, y_calib, _, _ = load_embedded()
        return x_calib, y_calib
    if spec == "digits":
        from .data import load_digits_split

        _, _, x_test, y_test = load_digits_split()
        return x_test, y_test
    path = Path(spec)
    if path.is_dir():
        raise ValueError(
            f"The '--data' folder '{spec}' is read batch by batch by "
            "recon.images.ImageFolderBatches, not as one tensor."
        )
    if not path.is_file():
        raise ValueError(
            f"The '--data' spec must be a folder of images, a .pt/.npy file or one of "
            f"{BUILTIN_DATA}. Got {spec!r} instead."
        )
    if path.suffix.lower() == ".npy":
        return _npy(path, unsafe_pickle), None
    obj = read_torch_file(
        spec,
        "'--data'",
        unsafe_pickle=unsafe_pickle,
        advice=" Otherwise save the images alone: torch.save(images, path) or np.save.",
    )
    labels = None
    if isinstance(obj, dict):
        obj, labels = obj.get("inputs", obj.get("x")), obj.get("labels", obj.get("y"))
    elif isinstance(obj, tuple | list) and len(obj) == 2:
        obj, labels = obj
    if isinstance(obj, np.ndarray):  # only read with unsafe_pickle
        obj = _as_tensor(obj, spec)
    if not isinstance(obj, Tensor):
        raise ValueError(
            f"The '--data' file {spec!r} must hold a tensor, an (inputs, labels) pair or a "
            f"dict with 'inputs'. Got {type(obj).__name__} instead."
        )
    if not isinstance(labels, Tensor):
        labels = None
    return obj.float(), labels


def _npy(path: Path, unsafe_pickle: bool) -> Tensor:
    try:
        array = np.load(path, allow_pickle=unsafe_pickle)
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise ValueError(f"The '--data' file '{path}' cannot be read: {exc}") from exc
        raise PickleRefusedError(
            f"The '--data' file '{path}' holds pickled Python objects (a NumPy object "
            "array or a pickle), which recon does not load by default: unpickling runs code "
            f"chosen by whoever made the file. If you trust the file, add {_UNSAFE_FLAG}. "
            "Otherwise save the images as numbers: np.save(path, images.astype('float32'))."
        ) from None
    except Exception as exc:
        raise ValueError(
            f"The '--data' file '{path}' cannot be read by np.load ({type(exc).__name__}: "
            f"{_first_line(exc)})."
        ) from exc
    return _as_tensor(array, str(path))


def _as_tensor(array: Any, path: str) -> Tensor:
    if not isinstance(array, np.ndarray):
        raise ValueError(
            f"The '--data' file '{path}' must hold an array of images. Got "
            f"{type(array).__name__} instead."
        )
    try:
        return torch.from_numpy(np.asarray(array, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"The '--data' file '{path}' must hold numbers. Got an array of dtype "
            f"{array.dtype} ({exc})."
        ) from exc
