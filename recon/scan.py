"""Li et al.'s sensitivity analysis: every unit pruned alone, at several keep ratios.

Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets" (ICLR
2017), Section 3.3 and Figure 2: each layer is pruned on its own, at a range of ratios,
and the network's accuracy on a validation set is plotted per layer. Layers whose
accuracy holds are pruned together at one ratio; the *sensitive* ones, whose accuracy
falls, are pruned little or not at all.

:func:`sensitivity_scan` makes those curves with :func:`recon.prune` (``channels=``
one unit at a time), with and without the least-squares re-fit, so the figure also
shows how much the re-fit changes which layers are sensitive. :meth:`ScanResult.keep_ratio`
turns the curves into the ``keep_ratio`` dict :func:`recon.prune` takes (optionally
meeting a FLOPs target), and :meth:`ScanResult.plot` draws Li et al.'s Figure 2
(matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import budget as _budget
from ._progress import progress_bar
from ._utils import model_device
from .api import _budget_unit, prune
from .graph import find_units
from .solve import RECONSTRUCT

__all__ = ["DEFAULT_RATIOS", "ScanResult", "sensitivity_scan"]

#: Keep ratios scanned by default: Li et al.'s 10 % to 90 % of the filters pruned away.
DEFAULT_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass
class ScanResult:
    """What :func:`sensitivity_scan` returns.

    Attributes
    ----------
    ratios : tuple of float
        The keep ratios scanned, in decreasing order.
    metric : {"accuracy", "output_error"}
        Top-1 accuracy on the labelled ``val`` images (higher is better), or the
        relative output error ``Σ‖f'(x) − f(x)‖² / Σ‖f(x)‖²`` of the pruned network
        ``f'`` against the original ``f`` on unlabelled ones (lower is better).
    baseline : float
        The metric of the unpruned model (its accuracy; 0 for the output error).
    curves : dict of str to dict of str to list of float
        ``curves[reconstruct][unit]``: the metric with only ``unit`` pruned, at each
        ratio of ``ratios``, with each re-fit scanned.
    channels : dict of str to list of int
        The channels ``unit`` keeps at each ratio.
    widths : dict of str to int
        Each unit's channels before pruning.
    method : str
        The channel selection used.
    """

    ratios: tuple[float, ...]
    metric: str
    baseline: float
    curves: dict[str, dict[str, list[float]]]
    channels: dict[str, list[int]]
    widths: dict[str, int]
    method: str
    _budget: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    def drop(self, reconstruct: str = "lstsq") -> dict[str, list[float]]:
        """How much worse each unit's metric is than the baseline, at each ratio:
        accuracy lost, or output error gained (>= 0 is worse)."""
        sign = 1.0 if self.metric == "accuracy" else -1.0
        return {
            u: [sign * (self.baseline - v) for v in values]
            for u, values in self._curves(reconstruct).items()
        }

    def _curves(self, reconstruct: str) -> dict[str, list[float]]:
        if reconstruct not in self.curves:
            raise ValueError(
                f"The 'reconstruct' argument must be one of the re-fits scanned, "
                f"{tuple(self.curves)}. Got {reconstruct!r} instead."
            )
        return self.curves[reconstruct]

    def sensitive(
        self, ratio: float, *, tolerance: float = 0.01, reconstruct: str = "lstsq"
    ) -> list[str]:
        """The units whose :meth:`drop` at keep ratio ``ratio`` exceeds ``tolerance``
        (linear between the scanned ratios; below the lowest, the lowest's)."""
        _check_ratio("ratio", ratio)
        _check_tolerance(tolerance)
        drops = self.drop(reconstruct)
        return [u for u, d in drops.items() if _at(self.ratios, d, ratio) > tolerance]

    def safe_ratio(
        self, unit: str, *, tolerance: float = 0.01, reconstruct: str = "lstsq"
    ) -> float:
        """The lowest scanned ratio down to which ``unit`` loses at most ``tolerance``
        at every scanned ratio (1.0 if it loses more already at the highest)."""
        _check_tolerance(tolerance)
        drops = self.drop(reconstruct)
        if unit not in drops:
            raise ValueError(
                f"The 'unit' argument must be a unit scanned ({', '.join(drops)}). Got "
                f"{unit!r} instead."
            )
        safe = 1.0
        for r, d in zip(self.ratios, drops[unit], strict=True):
            if d > tolerance:
                break
            safe = r
        return safe

    def keep_ratio(
        self,
        *,
        ratio: float | None = None,
        speedup: float | None = None,
        tolerance: float = 0.01,
        reconstruct: str = "lstsq",
    ) -> dict[str, float]:
        """Per-unit keep ratios as Li et al. set them from the curves.

        The units that lose more than ``tolerance`` (of accuracy, or of relative output
        error) when pruned alone to the shared ratio are *sensitive*: each keeps its
        :meth:`safe_ratio`, the lowest scanned ratio down to which it loses at most
        ``tolerance`` (all its channels if none), so it is pruned little or not at
        all. The others share one ratio. Give exactly one of:

        ``ratio``
            the shared keep ratio (Li et al.'s hand-picked one);
        ``speedup``
            a FLOPs target: the shared ratio is the largest that meets it with the
            sensitive units at their safe ratios (FLOPs predicted as
            :func:`recon.prune` predicts them; then single units get a channel back,
            the widest first, while the target is still met), found by alternating the
            two until the sensitive set stops growing (a lower ratio can only add
            sensitive units).

        Parameters
        ----------
        ratio : float in (0, 1], optional
        speedup : float > 1, optional
        tolerance : float >= 0, default 0.01
            One point of accuracy, or 0.01 of relative output error.
        reconstruct : str, default "lstsq"
            Whose curves decide (one of the re-fits scanned).

        Returns
        -------
        dict of str to float
            Unit name -> keep ratio, for ``recon.prune(model, calib, keep_ratio=...)``.
            With ``speedup``, each ratio is a count over the unit's width, so
            :func:`recon.prune` keeps exactly the counts that met the target.

        Raises
        ------
        ValueError
            For a bad argument, or a ``speedup`` that the insensitive units cannot
            reach with the sensitive ones at their safe ratios (the message says how
            many units are sensitive).
        """
        if (ratio is None) == (speedup is None):
            raise ValueError(
                "Exactly one of the 'ratio' and 'speedup' arguments must be given. Got "
                + ("both." if ratio is not None else "neither.")
            )
        _check_tolerance(tolerance)
        drops = self.drop(reconstruct)

        def safe(u: str) -> float:
            return self.safe_ratio(u, tolerance=tolerance, reconstruct=reconstruct)

        if ratio is not None:
            _check_ratio("ratio", ratio)
            return {
                u: safe(u) if _at(self.ratios, d, ratio) > tolerance else float(ratio)
                for u, d in drops.items()
            }
        if isinstance(speedup, bool) or not isinstance(speedup, int | float) or not speedup > 1:
            raise ValueError(
                f"The 'speedup' argument must be a float > 1. Got {speedup!r} instead."
            )
        if self._budget is None:
            raise ValueError(
                "This ScanResult has no FLOPs model (it was not made by sensitivity_scan)."
            )
        units, module_flops, total = self._budget
        widths = self.widths
        fixed: dict[str, int] = {}  # the sensitive units' counts, at their safe ratios

        def counts_at(r: float) -> dict[str, int]:
            free = {u: max(1, math.floor(r * w + 0.5)) for u, w in widths.items()}
            return free | fixed  # unscanned units: whole

        def speed(r: float) -> float:
            return total / _budget.predict_flops(units, counts_at(r), module_flops, total)

        while True:
            if speed(0.0) < speedup * (1 - 1e-9):
                raise ValueError(
                    f"The 'speedup' argument {speedup!r} cannot be met with the "
                    f"{len(fixed)} unit(s) sensitive at tolerance {tolerance!r} at their "
                    f"safe ratios (at most {speed(0.0):.3g}x). Raise the 'tolerance' or "
                    "lower the 'speedup'."
                )
            lo, hi = 0.0, 1.0  # speed(lo) >= speedup; the largest such ratio
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if speed(mid) >= speedup else (lo, mid)
            counts = counts_at(lo)
            # the shared ratio moves many counts at once: give channels back one unit at
            # a time, the widest first, while the target is still met
            for u in sorted(widths, key=lambda n: -widths[n]):
                if u in fixed:
                    continue
                while counts[u] < widths[u]:
                    counts[u] += 1
                    flops = _budget.predict_flops(units, counts, module_flops, total)
                    if total / flops < speedup:
                        counts[u] -= 1
                        break
            more = {
                u for u, d in drops.items()
                if u not in fixed and _at(self.ratios, d, counts[u] / widths[u]) > tolerance
            }  # fmt: skip
            if not more:
                return {u: counts[u] / widths[u] for u in widths}
            fixed |= {u: max(1, math.floor(safe(u) * widths[u] + 0.5)) for u in more}

    def plot(self, path: str | None = None, *, reconstruct: Sequence[str] | None = None) -> Any:
        """Li et al.'s Figure 2: the metric against the share of channels pruned away,
        one line per unit, one panel per re-fit. Needs matplotlib (the ``plot`` extra).

        Parameters
        ----------
        path : str, optional
            Save the figure here (any format matplotlib writes).
        reconstruct : sequence of str, optional
            The re-fits to draw (default: every one scanned).

        Returns
        -------
        matplotlib.figure.Figure
        """
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - the plot extra is not installed
            raise ImportError(
                "ScanResult.plot needs matplotlib: pip install 'recon[plot]'."
            ) from exc
        recs = list(self.curves) if reconstruct is None else list(reconstruct)
        for rec in recs:
            self._curves(rec)
        fig, axes = plt.subplots(1, len(recs), figsize=(5.5 * len(recs), 4.2), squeeze=False)
        pruned = [0.0] + [100 * (1 - r) for r in self.ratios]
        cmap = plt.get_cmap("viridis")
        names = list(self.widths)
        for ax, rec in zip(axes[0], recs, strict=True):
            for j, (unit, values) in enumerate(self.curves[rec].items()):
                ys = [self.baseline, *values]
                if self.metric == "accuracy":
                    ys = [100 * v for v in ys]
                color = cmap(j / max(1, len(names) - 1))
                ax.plot(pruned, ys, marker="o", ms=3, lw=1.2, color=color, label=unit)
            ax.set_xlabel("channels pruned away (%)")
            ax.set_ylabel("accuracy (%)" if self.metric == "accuracy" else "relative output error")
            ax.set_title(f"{self.method}, reconstruct={rec!r}")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=6, ncol=2, loc="best")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def as_dict(self) -> dict[str, Any]:
        """The scan as plain data (JSON-serialisable); :meth:`from_dict` reads it back."""
        keys = ("ratios", "metric", "baseline", "curves", "channels", "widths", "method")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], model: nn.Module, example: Tensor) -> ScanResult:
        """A scan from :meth:`as_dict`, with the FLOPs model of ``model`` (the network
        scanned) on the input ``example`` (1, C, H, W) for :meth:`keep_ratio`."""
        keys = ("ratios", "metric", "baseline", "curves", "channels", "widths", "method")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(
                f"The 'data' argument must be a ScanResult.as_dict(). Got one without {missing}."
            )
        d = {k: data[k] for k in keys}
        d["ratios"] = tuple(d["ratios"])
        return cls(**d, _budget=_flops_model(model, example, set(d["widths"])))


def _at(ratios: Sequence[float], values: Sequence[float], r: float) -> float:
    """``values`` (at decreasing ``ratios``; 0 at ratio 1) read at ``r``, linearly."""
    xs, ys = [1.0, *ratios], [0.0, *values]
    if r >= xs[0]:
        return 0.0
    for j in range(1, len(xs)):
        (x0, y0), (x1, y1) = (xs[j - 1], ys[j - 1]), (xs[j], ys[j])
        if x1 <= r <= x0:
            return y0 + (y1 - y0) * (x0 - r) / (x0 - x1) if x0 > x1 else y1
    return ys[-1]


def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"The '{name}' argument must be a float in (0, 1]. Got {value!r} instead.")
    return float(value)


def _check_tolerance(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(
            f"The 'tolerance' argument must be a finite float >= 0. Got {value!r} instead."
        )


def _check_val(val: Any) -> tuple[Tensor, Tensor | None]:
    """``val`` as images and labels (None: unlabelled)."""
    x, y = val if isinstance(val, tuple | list) and len(val) == 2 else (val, None)
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError(
            "The 'val' argument must be float images (N, C, H, W) or a tuple (images, "
            f"labels). Got {type(val).__name__} instead."
        )
    if y is not None and (
        not isinstance(y, Tensor) or y.shape != (len(x),) or y.is_floating_point()
    ):
        raise ValueError(
            f"The 'val' argument's labels must be an integer tensor of shape ({len(x)},). "
            f"Got {type(y).__name__} {tuple(getattr(y, 'shape', ()))} instead."
        )
    return x, y


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """The model's outputs (eval mode) on ``x``, batch by batch, on the CPU in float64."""
    dev = model_device(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return torch.cat([model(b.to(dev)).double().cpu() for b in x.split(batch_size)])
    finally:
        for m, mode in modes.items():
            m.train(mode)


def sensitivity_scan(
    model: nn.Module,
    calib: Tensor | Iterable[Any],
    val: Tensor | tuple[Tensor, Tensor],
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    method: str = "obs",
    reconstruct: str | Sequence[str] = ("lstsq", "none"),
    units: Iterable[str] | None = None,
    batch_size: int = 256,
    prune_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ScanResult:
    """Prune each unit alone at each keep ratio and measure the network on ``val``.

    For every unit ``u`` (a producer layer and its consumer, as :func:`recon.prune`
    names them), every ratio ``r`` and every re-fit in ``reconstruct``, the model is
    pruned with ``recon.prune(model, calib, channels={u: round(r * width)}, ...)`` (the
    other units whole) and evaluated: top-1 accuracy if ``val`` has labels, else the
    relative output error ``Σ‖f'(x) − f(x)‖² / Σ‖f(x)‖²`` against the original.

    Parameters
    ----------
    model : nn.Module
        The trained network; not modified.
    calib : Tensor or iterable
        Calibration images, as :func:`recon.prune` takes them.
    val : Tensor or tuple (Tensor, Tensor)
        Validation images (N, C, H, W), with integer labels (N,) for accuracy.
        Keep them apart from the test images the final numbers are reported on.
    ratios : sequence of float in (0, 1), default 0.9, 0.8, ..., 0.1
        Keep ratios (sorted decreasing; each unit keeps at least one channel).
    method : str, default "obs"
        Channel selection (:func:`recon.prune`'s ``method``).
    reconstruct : str or sequence of str, default ("lstsq", "none")
        The re-fits to scan, each a :func:`recon.prune` ``reconstruct``.
    units : iterable of str, optional
        Scan only these units (default: every prunable unit).
    batch_size : int, default 256
        Images per forward pass on ``val``.
    prune_options : dict, optional
        Further :func:`recon.prune` keywords (e.g. ``device``, ``max_images``); not
        the target, ``method``, ``reconstruct`` or ``progress``.
    progress : bool, default True
        A line per unit.

    Returns
    -------
    ScanResult
        The curves; ``.keep_ratio(...)`` turns them into per-unit ratios and
        ``.plot(...)`` draws them.

    Raises
    ------
    ValueError, TypeError
        For a bad argument, naming it, what it must be and what it was.

    Examples
    --------
    >>> import torch, recon
    >>> from recon.models import digits_vgg
    >>> net = digits_vgg(width=0.25).eval()
    >>> x = torch.randn(64, 1, 8, 8)
    >>> scan = recon.sensitivity_scan(net, x, x, ratios=(0.5,), reconstruct="lstsq",
    ...                               units=["features.0"], progress=False)
    >>> scan.metric, list(scan.curves["lstsq"])
    ('output_error', ['features.0'])
    >>> scan.keep_ratio(ratio=0.5, tolerance=1.0)
    {'features.0': 0.5}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be an nn.Module. Got {type(model).__name__} instead."
        )
    x, y = _check_val(val)
    if isinstance(ratios, str) or not isinstance(ratios, Sequence) or not ratios:
        raise TypeError(
            f"The 'ratios' argument must be a sequence of floats in (0, 1). Got {ratios!r} instead."
        )
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r < 1:
            raise ValueError(
                f"The 'ratios' argument must hold floats in (0, 1). Got {r!r} in {list(ratios)!r}."
            )
    ratios = tuple(sorted({float(r) for r in ratios}, reverse=True))
    recs = (reconstruct,) if isinstance(reconstruct, str) else tuple(reconstruct)
    if not recs or any(not isinstance(r, str) or r not in RECONSTRUCT for r in recs):
        raise ValueError(
            f"The 'reconstruct' argument must be one of {RECONSTRUCT} or a sequence of them. "
            f"Got {reconstruct!r} instead."
        )
    options = {} if prune_options is None else dict(prune_options)
    taken = sorted(
        set(options) & {"speedup", "keep_ratio", "channels", "method", "reconstruct", "progress"}
    )
    if taken:
        raise ValueError(
            "The 'prune_options' argument must not set the target, 'method', 'reconstruct' "
            f"or 'progress'. Got {', '.join(map(repr, taken))}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"The 'batch_size' argument must be an int >= 1. Got {batch_size!r} instead."
        )
    if isinstance(calib, Tensor):
        calib = [calib]
    elif not isinstance(calib, list | tuple):
        calib = list(calib)  # read once per prune

    graph = find_units(model)
    every = {
        u.name: u
        for u in graph.units
        if not (options.get("sampler_layers") is False and u.kind == "sampler")
    }
    if units is None:
        names = list(every)
    else:
        names = [units] if isinstance(units, str) else list(units)
        unknown = [n for n in names if n not in every]
        if unknown:
            raise ValueError(
                f"The 'units' argument must name prunable units of the model "
                f"({', '.join(list(every)[:6])}{', ...' if len(every) > 6 else ''}). Got "
                f"{unknown[0]!r} instead."
            )
    widths = {n: every[n].width for n in names}
    counts = {n: [max(1, math.floor(r * widths[n] + 0.5)) for r in ratios] for n in names}

    reference = _outputs(model, x, batch_size)  # (N, outputs)
    energy = float((reference**2).sum())

    def measure(net: nn.Module) -> float:
        out = _outputs(net, x, batch_size)
        if y is not None:
            return float((out.argmax(1) == y.to(out.device)).double().mean())
        return float(((out - reference) ** 2).sum()) / energy if energy > 0 else math.inf

    baseline = measure(model) if y is not None else 0.0
    curves: dict[str, dict[str, list[float]]] = {rec: {} for rec in recs}
    bar = progress_bar(names, desc="sensitivity", disable=not progress, unit="unit", log="each")
    for name in bar:
        bar.set_postfix_str(name)
        for rec in recs:
            values = []
            for k in counts[name]:
                if k >= widths[name]:
                    values.append(baseline)
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # one unit at a time: warned by a normal run
                    res = prune(
                        model, calib, channels={name: k}, method=method, reconstruct=rec,
                        progress=False, **options,
                    )  # fmt: skip
                values.append(measure(res.model))
                del res
            curves[rec][name] = values
    bar.close()

    return ScanResult(
        ratios=ratios,
        metric="accuracy" if y is not None else "output_error",
        baseline=baseline,
        curves=curves,
        channels=counts,
        widths=widths,
        method=method,
        _budget=_flops_model(model, x[:1], set(every)),
    )


def _flops_model(model: nn.Module, example: Tensor, names: set[str] | None = None) -> tuple:
    """``(budget units, FLOPs per module, total FLOPs)`` of ``model`` on ``example``
    (1, C, H, W), as :func:`recon.prune` predicts FLOPs with them; ``names`` keeps only
    some units (the others are then kept whole by :meth:`ScanResult.keep_ratio`)."""
    original = copy.deepcopy(model).eval()
    total, module_flops = _budget.count_flops(original, example.to(model_device(original)))
    units = [
        _budget_unit(u, original)
        for u in find_units(original).units
        if names is None or u.name in names
    ]
    return units, module_flops, int(total)
