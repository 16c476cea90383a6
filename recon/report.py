"""What a pruning run tells the user: a per-layer table, totals, and JSON.

:class:`Report` holds one :class:`LayerReport` per pruned unit (or sampler) and the
totals of the run, and, for residual networks, the output error of each residual
block. ``str(report)`` is an aligned plain-text table; ``to_json`` / ``from_dict``
round-trip it through JSON, with NaN errors written as ``null``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AllocationReport",
    "AllocationRow",
    "LayerReport",
    "RecoverReport",
    "Report",
    "format_count",
]

_PREFIXES = ("", "K", "M", "G", "T", "P")


def format_count(n: float, unit: str = "") -> str:
    """Format a count with a decimal prefix (K, M, G, T, P) and 4 significant digits.

    Parameters
    ----------
    n : float
        The count (FLOPs, parameters, ...).
    unit : str, default ""
        Unit appended after the prefix, separated from the number by a space.

    Returns
    -------
    str

    Examples
    --------
    >>> format_count(313_524_224, "FLOPs")
    '313.5 MFLOPs'
    >>> format_count(14_728_266)
    '14.73M'
    >>> format_count(512, "FLOPs")
    '512 FLOPs'
    >>> format_count(999_999)
    '1M'
    """
    value = float(n)
    if not math.isfinite(value):
        text = str(value)
        return f"{text} {unit}" if unit else text
    index = 0
    while index < len(_PREFIXES) - 1 and abs(float(f"{value:.4g}")) >= 1000:
        value /= 1000
        index += 1
    number = f"{value:.4g}"
    if "e" in number:  # past the largest prefix
        number = f"{value:.0f}"
    prefix = _PREFIXES[index]
    if unit:
        return f"{number} {prefix}{unit}"
    return f"{number}{prefix}"


def _format_error(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-" if x is None or math.isnan(x) else str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4f}"
    return f"{x:.2e}"


def _format_ridge(x: float) -> str:
    if math.isnan(x):
        return "-"
    return "safe" if math.isinf(x) else f"{x:g}"


def _same_float(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def _same_floats(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal keys and, key by key, equal values (NaN equal to NaN)."""
    return a.keys() == b.keys() and all(_same_float(a[k], b[k]) for k in a)


def _json_float(x: float | None) -> float | None:
    """NaN and infinities have no JSON spelling: they become ``null``."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def _from_json_float(x: float | None) -> float:
    return math.nan if x is None else float(x)


@dataclass(eq=False)
class LayerReport:
    """What pruning did to one unit (or one residual-branch sampler).

    Parameters
    ----------
    name : str
        Unit (producer) name, or the sampler's name (the name of the residual
        branch's first conv + ``".sampler"``, e.g. ``"layer1.0.conv1.sampler"``).
    kind : str
        ``"conv"``, ``"linear"``, ``"tokens"`` (an MLP's hidden features: a linear
        layer read by another at every token) or ``"sampler"``. A sampler is a channel
        index-select put in front of a residual branch's first conv.
    channels_before, channels_after : int
        Channels of the unit before and after pruning; for a sampler, the channels
        of the block input and the channels the branch now reads.
    method : str
        Channel selection method (``"lasso"``, ``"thinet"``, ...).
    reconstruct : str
        Re-fitting of the consumer (``"lstsq"``, ``"scale"``, ``"none"``, ...).
    error_before : float
        Relative reconstruction error ``‖Y − Ŷ‖² / ‖Y‖²`` of the consumer output with
        the kept channels and the original weights; NaN if not computed.
    error_after : float
        The same error after re-fitting; NaN if not computed.
    seconds : float
        Wall time spent on this unit.
    note : str, default ""
        Anything the user should know, e.g. ``"lstsq->scale (wide linear consumer)"``.
    ridge : float, default NaN
        For ``reconstruct="lstsq"``: the ridge strength cross-validation chose, in units
        of the mean diagonal of the kept-patch Gram (0: plain least squares; ``inf``:
        the safe fit itself, which held out better than any least-squares fit).
    heldout_error : float, default NaN
        For ``reconstruct="lstsq"``: the cross-validated relative error of that fit
        (each fold of calibration images scored by a fit made on the others), to set
        beside ``error_after``, which is measured on the images it was fitted to.

    Notes
    -----
    Equality treats NaN errors as equal, so that a report equals its JSON round trip.
    """

    name: str
    kind: str
    channels_before: int
    channels_after: int
    method: str
    reconstruct: str
    error_before: float
    error_after: float
    seconds: float
    note: str = ""
    ridge: float = math.nan
    heldout_error: float = math.nan

    @property
    def kept_fraction(self) -> float:
        """``channels_after / channels_before`` (NaN when ``channels_before`` is 0)."""
        if self.channels_before == 0:
            return math.nan
        return self.channels_after / self.channels_before

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerReport):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, float) or isinstance(b, float):
                if not _same_float(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # mutable

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields (non-finite errors become ``None``)."""
        d = dataclasses.asdict(self)
        for key in ("error_before", "error_after", "seconds", "heldout_error"):
            d[key] = _json_float(d[key])
        d["ridge"] = "inf" if d["ridge"] == math.inf else _json_float(d["ridge"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        """Inverse of :meth:`to_dict` (``None`` errors become NaN)."""
        if not isinstance(d, dict):
            raise TypeError(
                f"The 'd' argument must be a dict from LayerReport.to_dict. "
                f"Got {type(d).__name__} instead."
            )
        kwargs = _pick_fields(cls, d, "LayerReport")
        for key in ("error_before", "error_after", "seconds", "heldout_error", "ridge"):
            if key in kwargs:  # reports saved before ridge/heldout_error existed lack them
                value = kwargs[key]
                kwargs[key] = math.inf if value == "inf" else _from_json_float(value)
        return cls(**kwargs)


def _pick_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    fields = dataclasses.fields(cls)
    required = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in d]
    if missing:
        raise ValueError(
            f"The 'd' argument must hold every field of {what}. Missing {missing} in keys "
            f"{sorted(d)}."
        )
    return {f.name: d[f.name] for f in fields if f.name in d}


_COLUMNS = (
    # (header, right-aligned)
    ("layer", False),
    ("kind", False),
    ("channels", True),
    ("kept", True),
    ("err before", True),
    ("err after", True),
    ("held out", True),
    ("ridge", True),
    ("time (s)", True),
    ("note", False),
)

_BLOCK_COLUMNS = (("block", False), ("output error", True))
_ALLOC_COLUMNS = (
    ("unit", False),
    ("width", True),
    ("uniform", True),
    ("chosen", True),
    ("sensitivity", True),
    ("trust", True),
    ("cost uniform", True),
    ("cost chosen", True),
)


def _table(columns: tuple[tuple[str, bool], ...], rows: list[list[str]]) -> list[str]:
    """Header, rule and rows, padded so that every line has the same length."""
    headers = [h for h, _ in columns]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        parts = [
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, (_, right) in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(parts)

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


@dataclass
class AllocationRow:
    """How many channels one unit keeps under ``allocation="auto"``, and why.

    Parameters
    ----------
    name : str
        Unit name.
    width : int
        Channels before pruning.
    uniform, chosen : int
        Channels kept under the uniform split of the target, and the count chosen.
    sensitivity : float
        Output error per unit of the layer's relative error (:mod:`recon.profile`).
    cost_uniform, cost : float
        Predicted output error of the unit at the uniform and at the chosen count.
    counts, costs : list
        The unit's predicted cost curve: every count it was allowed to keep, and the
        predicted output error of keeping it (what the allocation traded between units;
        empty in reports saved before it was recorded).
    trust : float, default 1.0
        How far from ``uniform`` the unit could move, 0 (not at all) to 1 (anywhere):
        less than 1 where its re-fit has nearly as many unknowns as samples
        (:func:`recon.profile.trust`; 1.0 in reports saved before it was recorded).
    """

    name: str
    width: int
    uniform: int
    chosen: int
    sensitivity: float
    cost_uniform: float
    cost: float
    counts: list[int] = field(default_factory=list, repr=False)
    costs: list[float] = field(default_factory=list, repr=False)
    trust: float = 1.0


@dataclass
class AllocationReport:
    """The channel allocation of a run (``allocation="auto"``).

    Parameters
    ----------
    mode : str
        ``"auto"``.
    rows : list of AllocationRow
        One per unit allocated (ignored units are left out), in unit order.
    images, heldout_images : int
        Calibration images behind the error curves, and those the sensitivities were
        measured on.
    flops_uniform, flops_chosen : float
        Predicted FLOPs of the uniform split and of the chosen counts.
    solver : str
        What :func:`recon.allocate.allocate` used (``"tree dp"``, ...).
    """

    mode: str
    rows: list[AllocationRow]
    images: int
    heldout_images: int
    flops_uniform: float
    flops_chosen: float
    solver: str

    @property
    def cost_uniform(self) -> float:
        """Summed predicted output error of the uniform split."""
        return sum(r.cost_uniform for r in self.rows)

    @property
    def cost(self) -> float:
        """Summed predicted output error of the chosen counts."""
        return sum(r.cost for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for row in d["rows"]:
            for key in ("sensitivity", "cost_uniform", "cost"):
                row[key] = _json_float(row[key])
            row["costs"] = [_json_float(v) for v in row["costs"]]
        for key in ("flops_uniform", "flops_chosen"):
            d[key] = _json_float(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AllocationReport:
        kwargs = _pick_fields(cls, d, "AllocationReport")
        rows = []
        for r in kwargs["rows"]:
            row = _pick_fields(AllocationRow, r, "AllocationRow")
            for key in ("sensitivity", "cost_uniform", "cost"):
                row[key] = _from_json_float(row[key])
            row["costs"] = [_from_json_float(v) for v in row.get("costs", [])]
            rows.append(AllocationRow(**row))
        kwargs["rows"] = rows
        for key in ("flops_uniform", "flops_chosen"):
            kwargs[key] = _from_json_float(kwargs[key])
        return cls(**kwargs)

    def to_text(self) -> list[str]:
        rows = [
            [
                r.name,
                str(r.width),
                str(r.uniform),
                str(r.chosen),
                f"{r.sensitivity:.3g}",
                f"{r.trust:.2f}",
                _format_error(r.cost_uniform),
                _format_error(r.cost),
            ]
            for r in self.rows
        ]
        lines = _table(_ALLOC_COLUMNS, rows)
        lines.append(
            f"allocation ({self.mode}, {self.solver}): predicted output error "
            f"{_format_error(self.cost_uniform)} uniform -> {_format_error(self.cost)} chosen; "
            f"profile of {self.images} images, sensitivities on {self.heldout_images}"
        )
        return lines


@dataclass
class RecoverReport:
    """What :func:`recon.recover` did.

    Attributes
    ----------
    mode : str
        ``"distill"`` or ``"blockwise"``.
    steps : int
        Optimiser steps run.
    best_step : int
        The step whose weights were kept (0: none improved the held-out error, the
        one-shot weights were kept).
    seconds : float
        Wall time of the recovery.
    images, heldout_images : int
        Calibration images trained on, and held out to measure the error.
    error_before, error_after : float
        Relative output error ``Σ‖f_θ(x) − f(x)‖² / Σ‖f(x)‖²`` on the held-out images,
        of the one-shot and of the returned model.
    points : int
        Matched feature points (block outputs) in the loss besides the output.
    """

    mode: str
    steps: int
    best_step: int
    seconds: float
    images: int
    heldout_images: int
    error_before: float
    error_after: float
    points: int = 0

    @property
    def accepted(self) -> bool:
        """Whether the recovered weights were kept (some step lowered the error)."""
        return self.best_step > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("seconds", "error_before", "error_after"):
            d[k] = _json_float(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecoverReport:
        kwargs = _pick_fields(cls, d, "RecoverReport")
        for k in ("seconds", "error_before", "error_after"):
            kwargs[k] = _from_json_float(kwargs[k])
        return cls(**kwargs)

    def to_text(self) -> str:
        if not self.accepted:
            what = "no step lowered it: the one-shot weights kept"
        else:
            what = f"{_format_error(self.error_after)} (step {self.best_step})"
        return (
            f"recovered ({self.mode}, {self.steps} steps on {self.images} images, "
            f"{self.seconds:.1f} s): held-out output error {_format_error(self.error_before)}"
            f" → {what}"
        )


@dataclass(eq=False)
class Report:
    """Summary of a pruning run.

    Parameters
    ----------
    layers : list of LayerReport
        One entry per pruned unit or sampler, in pruning order.
    flops_before, flops_after : int
        FLOPs of one forward pass of one image, before and after pruning.
    params_before, params_after : int
        Parameter counts before and after pruning.
    seconds : float
        Wall time of the whole run.
    method : str
        Channel selection method of the run.
    reconstruct : str
        Re-fitting method of the run.
    output_error : float or None, default None
        Relative error ``‖y − y'‖² / ‖y‖²`` of the final model output on the
        calibration data, if measured.
    blocks : dict of str to float, default {}
        Residual block name (e.g. ``"layer1.0"``) -> relative error
        ``‖out_pruned − out_original‖² / ‖out_original‖²`` of that block's output on
        the calibration data (NaN if not computable); empty for networks without
        residual blocks. Shown as a second table by :meth:`to_text`, in insertion
        order.
    phases : dict of str to float, default {}
        Wall time of the run per phase, in seconds: ``forward`` (passes of the networks
        over the calibration set), ``stats`` (gathering patches at the sampled positions
        and accumulating the float64 statistics), ``select``, ``solve`` (re-fitting and
        errors), ``surgery`` and ``other`` (checks, tracing, FLOPs counting). They add up
        to ``seconds``. On CUDA, kernels are charged to the phase that waits for them
        unless ``recon._timing.SYNCHRONIZE`` is set (``recon bench`` sets it). With
        ``allocation="auto"``, ``profile`` is the time spent profiling and allocating.
    allocation : AllocationReport or None, default None
        The channel allocation of an ``allocation="auto"`` run: per unit, channels under
        the uniform split and chosen, and their predicted cost. Shown as a table by
        :meth:`to_text`.
    recover : RecoverReport or None, default None
        Set on the result :func:`recon.recover` returns (its time is also the
        ``recover`` phase): steps and the held-out output error before and after.

    Examples
    --------
    >>> layer = LayerReport("features.0", "conv", 64, 32, "lasso", "lstsq",
    ...                     0.12, 0.03, 1.5)
    >>> report = Report([layer], 313_500_000, 156_200_000, 1_000_000, 600_000,
    ...                 2.0, "lasso", "lstsq")
    >>> round(report.speedup, 2)
    2.01
    >>> Report.from_dict(report.to_dict()) == report
    True
    """

    layers: list[LayerReport]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    seconds: float
    method: str
    reconstruct: str
    output_error: float | None = None
    blocks: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    allocation: AllocationReport | None = None
    recover: RecoverReport | None = None

    @property
    def speedup(self) -> float:
        """FLOPs ratio ``flops_before / flops_after`` (``inf`` if no FLOPs remain)."""
        if self.flops_after <= 0:
            return math.inf if self.flops_before > 0 else math.nan
        return self.flops_before / self.flops_after

    @property
    def params_ratio(self) -> float:
        """Parameter ratio ``params_before / params_after`` (``inf`` if none remain)."""
        if self.params_after <= 0:
            return math.inf if self.params_before > 0 else math.nan
        return self.params_before / self.params_after

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Report):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("blocks", "phases"):
                if not _same_floats(a, b):
                    return False
            elif isinstance(a, float) or isinstance(b, float):
                if not _same_float(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # mutable

    # ------------------------------------------------------------------ text

    def _rows(self) -> list[list[str]]:
        # "before → after" with the arrows of all rows one above the other
        wb = max((len(str(layer.channels_before)) for layer in self.layers), default=0)
        wa = max((len(str(layer.channels_after)) for layer in self.layers), default=0)
        rows = []
        for layer in self.layers:
            kept = layer.kept_fraction
            rows.append(
                [
                    layer.name,
                    layer.kind,
                    f"{layer.channels_before:>{wb}} → {layer.channels_after:>{wa}}",
                    "-" if math.isnan(kept) else f"{100 * kept:.1f}%",
                    _format_error(layer.error_before),
                    _format_error(layer.error_after),
                    _format_error(layer.heldout_error),
                    _format_ridge(layer.ridge),
                    f"{layer.seconds:.2f}",
                    layer.note,
                ]
            )
        return rows

    def to_text(self) -> str:
        """The report as aligned plain-text tables followed by the totals.

        The layer table comes first; then, if :attr:`blocks` is not empty, a table of
        block output errors. Every line of a table (header, rule and rows) has the
        same length.
        """
        lines = [f"recon pruning report (method={self.method}, reconstruct={self.reconstruct})"]
        lines.extend(_table(_COLUMNS, self._rows()))
        if self.blocks:
            rows = [[name, _format_error(err)] for name, err in self.blocks.items()]
            lines.append("")
            lines.extend(_table(_BLOCK_COLUMNS, rows))
        if self.allocation is not None:
            lines.append("")
            lines.extend(self.allocation.to_text())
        lines.append("")
        lines.extend(self._totals())
        return "\n".join(lines)

    def _totals(self) -> list[str]:
        flops = (
            f"{format_count(self.flops_before, 'FLOPs')} → "
            f"{format_count(self.flops_after, 'FLOPs')}, {self.speedup:.2f}× fewer"
        )
        params = (
            f"{format_count(self.params_before)} → {format_count(self.params_after)}, "
            f"{self.params_ratio:.2f}× fewer"
        )
        units = [layer for layer in self.layers if layer.kind != "sampler"]
        n_pruned = sum(1 for layer in units if layer.channels_after < layer.channels_before)
        layers = f"{n_pruned} of {len(units)} pruned"
        n_samplers = len(self.layers) - len(units)
        if n_samplers:
            layers += f", {n_samplers} sampler layer{'s' if n_samplers > 1 else ''}"
        items = [
            ("FLOPs", flops),
            ("params", params),
            ("layers", layers),
            ("wall time", f"{self.seconds:.2f} s"),
        ]
        if self.output_error is not None:
            items.append(("output error", _format_error(self.output_error)))
        if self.recover is not None:
            items.append(("recovery", self.recover.to_text()))
        measured = [
            (name, err)
            for name, err in self.blocks.items()
            if err is not None and not math.isnan(err)
        ]
        if measured:  # max keeps the first of equal errors
            name, err = max(measured, key=lambda item: item[1])
            items.append(("worst block", f"{name} ({_format_error(err)})"))
        width = max(len(k) for k, _ in items)
        return [f"{k.ljust(width)}  {v}" for k, v in items]

    def __str__(self) -> str:
        return self.to_text()

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: NaN and infinite floats become ``None``.

        Also holds the derived ``speedup`` (ignored by :meth:`from_dict`).
        """
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "flops_before": int(self.flops_before),
            "flops_after": int(self.flops_after),
            "params_before": int(self.params_before),
            "params_after": int(self.params_after),
            "seconds": _json_float(self.seconds),
            "method": self.method,
            "reconstruct": self.reconstruct,
            "output_error": _json_float(self.output_error),
            "blocks": {name: _json_float(err) for name, err in self.blocks.items()},
            "phases": {name: _json_float(sec) for name, sec in self.phases.items()},
            "speedup": _json_float(self.speedup),
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
            "recover": None if self.recover is None else self.recover.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output (or its JSON, parsed).

        Parameters
        ----------
        d : dict
            As written by :meth:`to_dict`; keys that are not fields are ignored, and
            a missing ``"blocks"``, ``"phases"`` or ``"allocation"`` (reports saved
            before they existed) means none.

        Returns
        -------
        Report
        """
        if not isinstance(d, dict):
            raise TypeError(
                f"The 'd' argument must be a dict from Report.to_dict. "
                f"Got {type(d).__name__} instead."
            )
        kwargs = _pick_fields(cls, d, "Report")
        kwargs["layers"] = [LayerReport.from_dict(x) for x in kwargs["layers"]]
        kwargs["seconds"] = _from_json_float(kwargs["seconds"])
        blocks = kwargs.get("blocks") or {}
        kwargs["blocks"] = {str(name): _from_json_float(err) for name, err in blocks.items()}
        phases = kwargs.get("phases") or {}
        kwargs["phases"] = {str(name): _from_json_float(sec) for name, sec in phases.items()}
        if kwargs.get("allocation") is not None:  # absent from reports saved before it
            kwargs["allocation"] = AllocationReport.from_dict(kwargs["allocation"])
        if kwargs.get("recover") is not None:  # absent from reports saved before it
            kwargs["recover"] = RecoverReport.from_dict(kwargs["recover"])
        return cls(**kwargs)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The report as JSON (indent 2); also written to ``path`` (UTF-8) if given.

        Parameters
        ----------
        path : str or path-like, optional
            File to write.

        Returns
        -------
        str
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text: str) -> Report:
        """Inverse of :meth:`to_json`: a report from JSON text."""
        return cls.from_dict(json.loads(text))
