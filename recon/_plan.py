"""Pruning plans: a plain record of what :func:`recon.prune` removed, and its replay.

A *plan* is a JSON-serialisable dict (strings, numbers, lists, dicts, None) that says,
for every unit of the unpruned network, which channels were kept — with the unit's
structure (producer, BatchNorms and depthwise convs between, consumer) so that the
surgery can be replayed on a freshly built model without the calibration data — plus
the settings of the run::

    {
      "format": "recon.plan", "format_version": 1,
      "recon_version": "0.1.0", "torch_version": "2.x",
      "model": "CifarResNet",
      "method": "lasso", "reconstruct": "lstsq", "seed": 0,
      "target": {"speedup": None, "keep_ratio": 0.5, "channels": None, ...},
      "options": {"samples_per_image": 10, "sampler_layers": True, ...},
      "units": {"layer1.0.conv1": {"kind": "plain", "width": 16, "kept": [0, 3, ...], ...},
                "layer1.0.conv1.sampler": {"kind": "sampler", ...}, ...},
      "samplers": {"layer1.0.conv1": {"in_channels": 16, "index": [1, 2, ...]}, ...},
      "added_biases": ["features.4"],
      "history": [],
    }

Indices are always in the numbering of the *unpruned* network. A pruned model carries
its plan (attribute ``_recon_plan``); pruning it again composes the new plan with it,
so the plan of a twice-pruned model still applies to the unpruned architecture (and
``history`` lists the settings of the earlier runs).

This module sees modules and plain data only.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .graph import Unit
from .layers import attention_heads
from .surgery import prune_unit

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "apply_plan", "check_plan", "make_plan"]

PLAN_FORMAT = "recon.plan"
#: Version of the plan layout; bumped when a reader of the old layout would misread it.
PLAN_VERSION = 1
_ATTR = "_recon_plan"  # where a pruned model carries its plan
_UNIT_KEYS = ("kind", "producer", "consumer", "consumer_kind", "width", "taps", "kept")
_READER_KEYS = ("name", "consumer", "consumer_kind", "taps")
_CONSUMER_KINDS = ("conv", "linear", "tokens", "heads")
# The settings of one run, copied into the next plan's "history" when plans compose.
_RUN_KEYS = ("recon_version", "torch_version", "method", "reconstruct", "seed", "target", "options")


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: dicts with str keys, lists, str, int, float, None."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_jsonable(v) for v in value]
    return str(value)


def plan_of(model: nn.Module) -> dict[str, Any] | None:
    """The plan a pruned model carries, if any (a copy)."""
    plan = getattr(model, _ATTR, None)
    return copy.deepcopy(plan) if isinstance(plan, dict) else None


def attach(model: nn.Module, plan: dict[str, Any]) -> None:
    """Let ``model`` carry ``plan`` (a plain attribute: not in the state_dict)."""
    object.__setattr__(model, _ATTR, copy.deepcopy(plan))


def _unit_entry(unit: Unit, kept: list[int]) -> dict[str, Any]:
    return {
        "kind": unit.kind,
        "producer": unit.producer,
        "consumer": unit.consumer,
        "consumer_kind": unit.consumer_kind,
        "channelwise": list(unit.channelwise),
        "consumer_bn": unit.consumer_bn,
        "width": int(unit.width),
        "taps": int(unit.taps),
        "kept": [int(i) for i in kept],
        **({"gate": list(unit.gate)} if unit.gate is not None else {}),
        **({"cat_lead": list(unit.cat_lead)} if unit.cat_lead is not None else {}),
        **({"cat_after": list(unit.cat_after)} if unit.cat_after else {}),
        **({"readers": [_reader_entry(r) for r in unit.readers]} if unit.readers else {}),
    }


def _reader_entry(r: Unit) -> dict[str, Any]:
    """Another conv reading a unit's channels (:attr:`recon.graph.Unit.readers`)."""
    return {
        "name": r.name,
        "consumer": r.consumer,
        "consumer_kind": r.consumer_kind,
        "consumer_bn": r.consumer_bn,
        "taps": int(r.taps),
        **({"cat_lead": list(r.cat_lead)} if r.cat_lead is not None else {}),
        **({"cat_after": list(r.cat_after)} if r.cat_after else {}),
    }


def make_plan(
    units: Iterable[Unit],
    kept: Mapping[str, list[int]],
    original: nn.Module,
    pruned: nn.Module,
    *,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The plan of one :func:`recon.prune` run, composed with the one ``original`` carries.

    Parameters
    ----------
    units : iterable of Unit
        The units of ``original`` (forward order).
    kept : mapping of str to list of int
        Kept channels per unit, numbered as in ``original``.
    original, pruned : nn.Module
        The model before and after pruning (to find consumers that gained a bias).
    settings : mapping
        ``method``, ``reconstruct``, ``seed`` and the target and options of the run.

    Returns
    -------
    dict
        A plan (see the module docstring); ``check_plan`` accepts it.
    """
    units = list(units)
    settings = _jsonable(dict(settings))
    entries = {u.name: _unit_entry(u, kept[u.name]) for u in units}
    added = [
        u.consumer
        for u in units
        if getattr(original.get_submodule(u.consumer), "bias", None) is None
        and getattr(pruned.get_submodule(u.consumer), "bias", None) is not None
    ]
    history: list[dict[str, Any]] = []
    base = plan_of(original)
    if base is not None:
        try:
            check_plan(base)
            stale = [
                f"unit '{n}' has {e['width']} channels, the plan keeps "
                f"{len(base['units'][n]['kept'])}"
                for n, e in entries.items()
                if n in base["units"] and len(base["units"][n]["kept"]) != e["width"]
            ]
        except ValueError as exc:
            stale = [str(exc)]
        if stale:
            warnings.warn(
                "the model carries a recon plan that does not match its layers "
                f"({stale[0]}); the new plan describes this run only, relative to the "
                "model as given",
                stacklevel=3,
            )
            base = None
    if base is not None:  # compose: indices into the base's kept channels
        for name, e in entries.items():
            old = base["units"].get(name)
            if old is not None:
                e["width"] = old["width"]
                e["kept"] = [old["kept"][i] for i in e["kept"]]
        entries = {**base["units"], **entries}
        added = list(dict.fromkeys([*base.get("added_biases", []), *added]))
        history = [*base.get("history", []), {k: base[k] for k in _RUN_KEYS if k in base}]
    plan: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "format_version": PLAN_VERSION,
        "recon_version": __version__,
        "torch_version": str(torch.__version__),
        "model": type(original).__name__,
        **settings,
        "units": entries,
        "samplers": _samplers(entries),
        "added_biases": added,
        "history": history,
    }
    json.dumps(plan)  # a plan is plain data, always
    return plan


def _samplers(units: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The sampler layers of a plan: consumer -> the block-input channels it reads."""
    return {
        e["consumer"]: {"in_channels": e["width"], "index": list(e["kept"])}
        for e in units.values()
        if e["kind"] == "sampler" and e["kept"] != list(range(e["width"]))
    }


# --------------------------------------------------------------------------- checks


def check_plan(plan: Any, source: str = "The 'plan' argument") -> dict[str, Any]:
    """Check that ``plan`` is a well-formed plan; a ``ValueError`` saying what is wrong.

    ``source`` starts the message (e.g. the file a plan was read from).
    """

    def bad(what: str) -> ValueError:
        return ValueError(f"{source} is not a valid recon plan: {what}.")

    if not isinstance(plan, dict):
        raise bad(f"expected a dict, got {type(plan).__name__}")
    if plan.get("format") != PLAN_FORMAT:
        raise bad(f"expected 'format' = {PLAN_FORMAT!r}, got {plan.get('format')!r}")
    version = plan.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"expected an int 'format_version' >= 1, got {version!r}")
    if version > PLAN_VERSION:
        raise ValueError(
            f"{source} is a recon plan of format version {version}, newer than this recon "
            f"({__version__}) reads (version {PLAN_VERSION}); upgrade recon to read it."
        )
    units = plan.get("units")
    if not isinstance(units, dict):
        raise bad(f"expected a dict 'units', got {type(units).__name__}")
    for name, e in units.items():
        if not isinstance(e, dict) or any(k not in e for k in _UNIT_KEYS):
            raise bad(f"unit {name!r} must be a dict with keys {list(_UNIT_KEYS)}")
        if e["kind"] not in ("plain", "sampler") or e["consumer_kind"] not in _CONSUMER_KINDS:
            raise bad(f"unit {name!r} has kind {e['kind']!r}, consumer_kind {e['consumer_kind']!r}")
        if not isinstance(e["consumer"], str) or (
            e["kind"] == "plain" and not isinstance(e["producer"], str)
        ):
            raise bad(f"unit {name!r} must name its producer and consumer modules")
        readers = e.get("readers", [])
        if not isinstance(readers, list) or any(
            not isinstance(r, dict)
            or any(k not in r for k in _READER_KEYS)
            or r["consumer_kind"] not in _CONSUMER_KINDS
            or not isinstance(r["consumer"], str)
            or isinstance(r["taps"], bool)
            or not isinstance(r["taps"], int)
            or r["taps"] < 1
            for r in readers
        ):
            raise bad(
                f"unit {name!r} must list its other readers as dicts with keys "
                f"{list(_READER_KEYS)} (consumer_kind one of {list(_CONSUMER_KINDS)}, an int "
                "taps >= 1)"
            )
        width, taps, kept = e["width"], e["taps"], e["kept"]
        for key, v in (("width", width), ("taps", taps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(f"unit {name!r} has {key} {v!r}, expected an int >= 1")
        if (
            not isinstance(kept, list)
            or not kept
            or any(isinstance(i, bool) or not isinstance(i, int) for i in kept)
            or len(set(kept)) != len(kept)
            or min(kept) < 0
            or max(kept) >= width
        ):
            raise bad(
                f"unit {name!r} must keep a non-empty list of distinct channels in "
                f"[0, {width}), got {kept!r}"
            )
        cw = e.get("channelwise", [])
        if not isinstance(cw, list) or not all(isinstance(n, str) for n in cw):
            raise bad(f"unit {name!r} has 'channelwise' {cw!r}, expected a list of names")
    added = plan.get("added_biases", [])
    if not isinstance(added, list) or not all(isinstance(n, str) for n in added):
        raise bad(f"expected 'added_biases' to be a list of module names, got {added!r}")
    if not isinstance(plan.get("history", []), list):
        raise bad("expected 'history' to be a list")
    return plan


def _unit(name: str, e: dict[str, Any]) -> Unit:
    return Unit(
        name=name,
        producer=e["producer"],
        consumer=e["consumer"],
        consumer_kind=e["consumer_kind"],
        width=e["width"],
        taps=e["taps"],
        channelwise=tuple(e.get("channelwise", ())),
        consumer_bn=e.get("consumer_bn"),
        kind=e["kind"],
        gate=tuple(e["gate"]) if e.get("gate") else None,
        cat_lead=tuple(e["cat_lead"]) if "cat_lead" in e else None,
        cat_after=tuple(e.get("cat_after", ())),
        readers=tuple(
            Unit(
                name=r["name"],
                producer=e["producer"],
                consumer=r["consumer"],
                consumer_kind=r["consumer_kind"],
                width=e["width"],
                taps=r["taps"],
                consumer_bn=r.get("consumer_bn"),
                cat_lead=tuple(r["cat_lead"]) if "cat_lead" in r else None,
                cat_after=tuple(r.get("cat_after", ())),
            )
            for r in e.get("readers", ())
        ),
    )


def _mismatches(model: nn.Module, plan: dict[str, Any]) -> list[str]:
    """Every way ``model`` differs from the unpruned network ``plan`` was made for."""
    modules = dict(model.named_modules())
    out: list[str] = []

    def get(name: str, kinds: tuple[type, ...], what: str) -> Any:
        m = modules.get(name)
        if m is None:
            out.append(f"it has no module '{name}'")
        elif not isinstance(m, kinds):
            out.append(f"'{name}' is a {type(m).__name__}, expected a {what}")
        else:
            return m
        return None

    for e in plan["units"].values():
        width = e["width"]
        if e["kind"] == "plain":
            if e["consumer_kind"] == "heads":  # an attention layer's heads
                p = get(e["producer"], (nn.Module,), "attention layer")
                heads = None if p is None else attention_heads(p)
                if p is not None and heads is None:
                    out.append(f"'{e['producer']}' is a {type(p).__name__}, not an attention layer")
                elif heads is not None and heads != (width, e["taps"]):
                    out.append(
                        f"'{e['producer']}' has {heads[0]} heads of {heads[1]} features, "
                        f"not {width} of {e['taps']}"
                    )
            elif e["consumer_kind"] == "tokens":  # an MLP's hidden features
                p = get(e["producer"], (nn.Linear,), "Linear")
                if p is not None and p.out_features != width:
                    out.append(
                        f"'{e['producer']}' has {p.out_features} output features, not {width}"
                    )
            else:
                p = get(e["producer"], (nn.Conv2d,), "Conv2d")
                if p is not None and p.out_channels != width:
                    out.append(
                        f"'{e['producer']}' has {p.out_channels} output channels, not {width}"
                    )
            for cw_name in e.get("channelwise", []):
                m = get(cw_name, (nn.BatchNorm2d, nn.Conv2d), "BatchNorm2d or depthwise Conv2d")
                if isinstance(m, nn.BatchNorm2d) and m.num_features != width:
                    out.append(f"'{cw_name}' normalises {m.num_features} channels, not {width}")
                elif isinstance(m, nn.Conv2d) and not m.groups == m.in_channels == m.out_channels:
                    out.append(f"'{cw_name}' is not a depthwise convolution (groups={m.groups})")
                elif isinstance(m, nn.Conv2d) and m.in_channels != width:
                    out.append(f"'{cw_name}' has {m.in_channels} channels, not {width}")
        if e.get("gate"):
            fc1 = get(e["gate"][0], (nn.Conv2d,), "Conv2d")
            fc2 = get(e["gate"][1], (nn.Conv2d,), "Conv2d")
            if fc1 is not None and fc1.in_channels != width:
                out.append(f"'{e['gate'][0]}' reads {fc1.in_channels} channels, not {width}")
            if fc2 is not None and fc2.out_channels != width:
                out.append(f"'{e['gate'][1]}' writes {fc2.out_channels} channels, not {width}")
        for r in [e, *e.get("readers", [])]:
            _reader_mismatches(r, width, get, out)
    for name in plan.get("added_biases", []):
        get(name, (nn.Conv2d, nn.Linear), "Conv2d or Linear")
    return out


def _reader_mismatches(e: dict[str, Any], width: int, get: Any, out: list[str]) -> None:
    """How the consumer (or other reader) of a unit's entry ``e`` differs from it."""
    taps = e["taps"]
    for name in e.get("cat_after", []):
        get(name, (nn.BatchNorm2d,), "BatchNorm2d")
    if e["consumer_kind"] == "conv":
        c = get(e["consumer"], (nn.Conv2d,), "Conv2d")
        if c is not None and "cat_lead" in e:  # the unit's slice of a concatenation
            if c.in_channels < width or c.kernel_size[0] * c.kernel_size[1] != taps:
                out.append(
                    f"'{e['consumer']}' reads {c.in_channels} channels with "
                    f"{c.kernel_size[0] * c.kernel_size[1]} taps, not at least {width} "
                    f"with {taps}"
                )
        elif c is not None and (c.in_channels, c.kernel_size[0] * c.kernel_size[1]) != (
            width,
            taps,
        ):
            out.append(
                f"'{e['consumer']}' reads {c.in_channels} channels with "
                f"{c.kernel_size[0] * c.kernel_size[1]} taps, not {width} with {taps}"
            )
    else:
        c = get(e["consumer"], (nn.Linear,), "Linear")
        wrong = c is not None and (
            c.in_features < width * taps if "cat_lead" in e else c.in_features != width * taps
        )
        if wrong:
            out.append(
                f"'{e['consumer']}' has {c.in_features} input features, not "
                f"{width} channels x {taps}"
            )


def apply_plan(model: nn.Module, plan: Mapping[str, Any], *, inplace: bool = False) -> nn.Module:
    """Reshape an unpruned model as ``plan`` says, without re-fitting anything.

    The kept channels of every unit are sliced out of the producer, the BatchNorms and
    depthwise convs between and the consumer, and sampler layers are put in front of
    residual branches, exactly as :func:`recon.prune` did; the weights are the model's
    own, sliced (consumers to which the pruning run added a bias get a zero bias). Load
    the pruned weights afterwards with ``load_state_dict`` — or use :func:`recon.load`,
    which does both — or fine-tune the reshaped model elsewhere.

    Parameters
    ----------
    model : nn.Module
        The unpruned architecture the plan was made for (e.g. a freshly built model).
        It is not modified unless ``inplace=True``.
    plan : dict
        A plan, as in ``PruneResult.plan`` (or read back from its JSON).
    inplace : bool, default False
        Reshape ``model`` itself instead of a copy.

    Returns
    -------
    nn.Module
        The reshaped model; it carries ``plan``, so that pruning it again composes.

    Raises
    ------
    ValueError
        If ``plan`` is malformed, or ``model`` is not the architecture it was made for
        (the message lists the modules that differ). Nothing is modified then.

    Examples
    --------
    >>> import torch, recon
    >>> from recon.models import vgg11
    >>> net = vgg11(width=0.125).eval()
    >>> result = recon.prune(net, torch.randn(128, 3, 32, 32), keep_ratio=0.5, progress=False)
    >>> fresh = recon.apply_plan(vgg11(width=0.125), result.plan)
    >>> fresh.load_state_dict(result.model.state_dict())
    <All keys matched successfully>
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be a torch.nn.Module. Got {type(model).__name__} instead."
        )
    if not isinstance(inplace, bool):
        raise TypeError(f"The 'inplace' argument must be a bool. Got {inplace!r} instead.")
    plan = check_plan(copy.deepcopy(dict(plan)) if isinstance(plan, Mapping) else plan)
    wrong = _mismatches(model, plan)
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise ValueError(
            f"The 'model' argument is not the unpruned architecture the plan was made for "
            f"(a {plan.get('model', '?')}; got a {type(model).__name__}): "
            + "; ".join(wrong[:5])
            + more
            + "."
        )
    out = model if inplace else copy.deepcopy(model)
    for name, e in plan["units"].items():
        if e["kept"] != list(range(e["width"])):
            prune_unit(out, _unit(name, e), torch.tensor(e["kept"], dtype=torch.long))
    for name in plan.get("added_biases", []):
        m = out.get_submodule(name)
        if m.bias is None:
            w = m.weight
            m.bias = nn.Parameter(
                torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                requires_grad=w.requires_grad,
            )
    attach(out, plan)
    return out
