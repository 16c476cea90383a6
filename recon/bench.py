"""Time and memory of one pruning run, beside one plain forward pass (``recon bench``).

:func:`run` prunes a model once and reports the run's wall time split into phases
(:attr:`recon.Report.phases`: forward passes, statistics, selection, solves,
surgery, other), its peak memory, and the ratio of the total to the time of **one
plain forward pass of the calibration set through the original model**, measured in
the same process just before. ``scripts/bench.py`` adds a naive reference, scaling
runs and inference latency on top of it.

Memory is the process's resident set: its peak (``VmHWM`` in ``/proc/self/status``,
reset before the run through ``/proc/self/clear_refs`` where Linux allows it, else
``getrusage``'s lifetime peak) and its size just before the run; on CUDA also
``torch.cuda.max_memory_allocated`` during the run.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _timing
from . import passes as _passes
from ._utils import model_device
from .api import PruneResult, prune
from .budget import count_flops
from .graph import called, find_units
from .passes import DEFAULT_CACHE_BYTES

__all__ = [
    "BenchResult",
    "forward_seconds",
    "machine",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_bytes",
    "run",
    "work",
]


# --------------------------------------------------------------------------- memory


def _status(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (None off Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident set size of this process now, in bytes (None if unknown)."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or start), in bytes."""
    peak = _status("VmHWM")
    if peak is not None:
        return peak
    import resource  # POSIX only

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the peak resident set size to the current one (Linux); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, Any]:
    """The machine and software a benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "memory_gib": round((_meminfo_total() or 0) / 2**30, 1),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name()
    return info


def _meminfo_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            return int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(model: nn.Module, batches: list[Tensor], *, repeats: int = 3) -> float:
    """Median wall time of one plain forward pass over ``batches`` (after a warm-up batch).

    ``torch.inference_mode``, the model in eval mode, ``batches`` already on its device.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"The 'repeats' argument must be an int >= 1. Got {repeats!r} instead.")
    device = model_device(model)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            model(batches[0])
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                for xb in batches:
                    model(xb)
                _sync(device)
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return statistics.median(times)


def work(
    model: nn.Module, example: Tensor, *, images: int, samples_per_image: int | None
) -> tuple[int, int]:
    """Multiply-adds of one forward pass of ``images`` images, and of the statistics.

    The statistics' count is that of the float64 patch Grams and cross terms of all
    units, ``Σ N·(d(d+1)/2 + d·n)`` (``N`` sampled rows, ``d = c·k`` patch length,
    ``n`` outputs; a symmetric update computes half the Gram). It bounds how close to
    one forward pass a pruning run can get, whatever the implementation.
    """
    graph = find_units(model)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for unit in graph.units:
        m = model.get_submodule(called(unit))  # attention heads: the attention layer

        def hook(_m, _inp, out, name=unit.consumer) -> None:
            out = out[0] if isinstance(out, tuple) else out  # attention: (output, weights)
            shapes[name] = tuple(out.shape)

        hooks.append(m.register_forward_hook(hook))
    try:
        flops, _ = count_flops(model, example[:1])
    finally:
        for h in hooks:
            h.remove()
    stats = 0
    for unit in graph.units:
        shape = shapes.get(unit.consumer)
        if shape is None:
            continue
        tokens = unit.consumer_kind in ("tokens", "heads")
        n = shape[-1] if tokens else shape[1]
        if unit.consumer_kind == "conv" or tokens:
            # a conv's output pixels; a token-wise linear layer's tokens (B, ..., n)
            positions = (
                shape[2] * shape[3] if unit.consumer_kind == "conv" else math.prod(shape[1:-1])
            )
            per_image = (
                positions if samples_per_image is None else min(samples_per_image, positions)
            )
        else:
            per_image = 1
        d = unit.width * unit.taps
        stats += images * per_image * (d * (d + 1) // 2 + d * n)
    return int(flops) // 2 * images, int(stats)


# --------------------------------------------------------------------------- result


@dataclass
class BenchResult:
    """One benchmarked pruning run.

    Attributes
    ----------
    forward_seconds : float
        One plain forward pass of the calibration set through the original model
        (median of repeats), measured in the same process.
    prune_seconds : float
        Wall time of ``recon.prune``.
    phases : dict of str to float
        ``prune_seconds`` split into phases (:attr:`recon.Report.phases`).
    peak_rss, base_rss : int or None
        Peak resident memory during the run and resident memory just before it (bytes).
    cuda_peak : int or None
        ``torch.cuda.max_memory_allocated`` during the run, on CUDA.
    forward_macs, stats_macs : int
        Multiply-adds of one forward pass of the calibration set and of the float64
        statistics (:func:`work`).
    single_pass : bool
        Whether the run used the single pruned pass per unit (False: the older scheme
        that runs each producer twice, :class:`recon.passes.Passes`).
    block_dtype : str
        The precision of the statistics' block products (``recon.prune``'s
        ``block_dtype``).
    """

    model: str
    images: int
    batch_size: int
    samples_per_image: int | None
    speedup: float
    method: str
    device: str
    cache_bytes: int
    forward_seconds: float
    prune_seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    peak_rss: int | None = None
    base_rss: int | None = None
    cuda_peak: int | None = None
    flops_ratio: float = float("nan")
    output_error: float | None = None
    forward_macs: int = 0
    stats_macs: int = 0
    machine: dict[str, Any] = field(default_factory=dict)
    single_pass: bool = True
    block_dtype: str = "float64"

    @property
    def ratio(self) -> float:
        """Pruning time in units of one plain forward pass of the calibration set."""
        return self.prune_seconds / self.forward_seconds if self.forward_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    def to_text(self) -> str:
        """A readable breakdown of the run."""
        mb = 2**20
        lines = [
            f"recon bench: {self.model}, {self.images} images in batches of {self.batch_size}, "
            f"{self.samples_per_image or 'all'} positions per image, {self.method}, "
            f"{self.speedup:g}x target, on {self.device} "
            f"({self.machine.get('torch_threads', torch.get_num_threads())} threads)"
            + ("" if self.single_pass else "; older double passes")
            + ("" if self.block_dtype == "float64" else f"; {self.block_dtype} block products"),
            f"  one plain forward pass of the calibration set   {self.forward_seconds:8.3f} s",
            f"  pruning, total                                   {self.prune_seconds:8.3f} s"
            f"   = {self.ratio:.1f} forward passes",
        ]
        for name, sec in self.phases.items():
            share = 100 * sec / self.prune_seconds if self.prune_seconds > 0 else 0.0
            lines.append(
                f"    {name:<10}{sec:9.3f} s  {share:5.1f}%   = "
                f"{sec / self.forward_seconds if self.forward_seconds else 0:.2f} forward passes"
            )
        if self.peak_rss is not None:
            extra = ""
            if self.base_rss is not None:
                extra = f" ({(self.peak_rss - self.base_rss) / mb:+.0f} MiB over the "
                extra += f"{self.base_rss / mb:.0f} MiB before)"
            lines.append(f"  peak memory (RSS)    {self.peak_rss / mb:8.0f} MiB{extra}")
        if self.cuda_peak is not None:
            lines.append(f"  peak CUDA allocated  {self.cuda_peak / mb:8.0f} MiB")
        lines.append(
            f"  cache budget {self.cache_bytes / mb:.0f} MiB;  FLOPs {self.flops_ratio:.2f}x "
            f"fewer;  output error {self.output_error if self.output_error is not None else '-'}"
        )
        if self.forward_macs:
            lines.append(
                f"  work: forward {self.forward_macs / 1e9:.2f} G multiply-adds (float32), "
                f"statistics {self.stats_macs / 1e9:.2f} G (float64), "
                f"{self.stats_macs / self.forward_macs:.1f}x the forward"
            )
        return "\n".join(lines)


@contextlib.contextmanager
def _synchronised(device: torch.device) -> Iterator[None]:
    old = _timing.SYNCHRONIZE
    _timing.SYNCHRONIZE = device.type == "cuda"
    try:
        yield
    finally:
        _timing.SYNCHRONIZE = old


def run(
    model: nn.Module,
    calib: Tensor,
    *,
    name: str = "model",
    speedup: float = 2.0,
    method: str = "lasso",
    reconstruct: str = "lstsq",
    allocation: str = "uniform",
    samples_per_image: int | None = 10,
    batch_size: int = 64,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    device: str | torch.device | None = None,
    seed: int = 0,
    repeats: int = 3,
    warmup: bool = True,
    single_pass: bool = True,
    block_dtype: str = "float64",
) -> tuple[BenchResult, PruneResult]:
    """Benchmark one ``recon.prune`` run against one plain forward pass.

    Parameters
    ----------
    model : nn.Module
        The trained model (not modified).
    calib : Tensor, shape (N, C, H, W)
        Calibration images, split into batches of ``batch_size``.
    name : str
        Label for the report.
    speedup, method, reconstruct, samples_per_image, cache_bytes, seed
        As for :func:`recon.prune`.
    allocation : str, default "uniform"
        As for :func:`recon.prune`; uniform by default, the split every timing in
        docs/benchmarks.md and the naive reference use (``"auto"`` adds its profile).
    device : str or torch.device, optional
        Where to run (default: the model's device).
    repeats : int, default 3
        Forward passes timed (the median is kept).
    warmup : bool, default True
        First prune one batch, so that one-time costs (lazy imports, kernel set-up) are
        not charged to the measured run.
    single_pass : bool, default True
        False times the older calibration passes, which run each producer twice
        (:class:`recon.passes.Passes`), for comparison.
    block_dtype : {"float64", "float32"}, default "float64"
        As for :func:`recon.prune`; "float32" times float32 block products.

    Returns
    -------
    BenchResult
    PruneResult
        The measured run's result (its ``.model`` for latency measurements).
    """
    if not isinstance(calib, Tensor) or calib.dim() != 4:
        raise ValueError(
            "The 'calib' argument must be a tensor of shape (N, C, H, W). "
            f"Got {type(calib).__name__} {tuple(getattr(calib, 'shape', ()))} instead."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"The 'batch_size' argument must be an int >= 1. Got {batch_size!r}.")
    dev = torch.device(device) if device is not None else model_device(model)
    model = model.to(dev).eval()
    batches = list(calib.to(dev).split(batch_size))
    fwd = forward_seconds(model, batches, repeats=repeats)
    kwargs: dict[str, Any] = {
        "speedup": speedup,
        "method": method,
        "reconstruct": reconstruct,
        "allocation": allocation,
        "samples_per_image": samples_per_image,
        "cache_bytes": cache_bytes,
        "seed": seed,
        "block_dtype": block_dtype,
        "progress": False,
    }
    with _passes_scheme(single_pass):
        seconds, result, base, peak, cuda_peak = _timed_prune(model, batches, kwargs, dev, warmup)
    fwd_macs, stats_macs = work(
        model, batches[0], images=calib.shape[0], samples_per_image=samples_per_image
    )
    report = result.report
    bench = BenchResult(
        model=name,
        images=int(calib.shape[0]),
        batch_size=batch_size,
        samples_per_image=samples_per_image,
        speedup=speedup,
        method=method,
        device=str(dev),
        cache_bytes=cache_bytes,
        forward_seconds=fwd,
        prune_seconds=seconds,
        phases=dict(report.phases),
        peak_rss=peak,
        base_rss=base,
        cuda_peak=cuda_peak,
        flops_ratio=report.speedup,
        output_error=report.output_error,
        forward_macs=fwd_macs,
        stats_macs=stats_macs,
        machine=machine(),
        single_pass=single_pass,
        block_dtype=block_dtype,
    )
    return bench, result


@contextlib.contextmanager
def _passes_scheme(single_pass: bool) -> Iterator[None]:
    old = _passes._SINGLE_PASS
    _passes._SINGLE_PASS = single_pass
    try:
        yield
    finally:
        _passes._SINGLE_PASS = old


def _timed_prune(
    model: nn.Module, batches: list[Tensor], kwargs: dict[str, Any], dev: torch.device,
    warmup: bool,
) -> tuple[float, PruneResult, int | None, int | None, int | None]:  # fmt: skip
    """Prune once (after a one-batch warm-up): seconds, result, RSS before and peak, CUDA peak."""
    if warmup:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few images: under-determined re-fits
            prune(model, batches[:1], **kwargs)
    base = rss_bytes()
    reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with _synchronised(dev):
        t0 = time.perf_counter()
        result = prune(model, batches, **kwargs)
        _sync(dev)
        seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    cuda_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return seconds, result, base, peak, cuda_peak
