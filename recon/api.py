"""``recon.prune``: argument checks, planning, and the per-layer loop.

This is the one module that knows every stage: it finds units in the graph
(:mod:`recon.graph`), turns the target into channel counts (:mod:`recon.budget`), and
for each unit in forward order accumulates statistics (:mod:`recon.stats`,
:mod:`recon.sampling`, over the calibration passes of :mod:`recon.passes`), selects
channels (:mod:`recon.select`), re-fits the consumer (:mod:`recon.solve`) and cuts the
channels out (:mod:`recon.surgery`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from . import budget as _budget
from . import distributed as _dist
from ._plan import attach, make_plan
from ._progress import progress_bar
from ._timing import PhaseTimer
from ._utils import model_device, model_dtype
from .graph import Graph, Unit, _node_of, find_units, trace
from .layers import SampledConv2d
from .passes import DEFAULT_CACHE_BYTES, Passes
from .report import LayerReport, Report
from .sampling import _mix, gather_patches, gather_targets, layer_key
from .select import METHODS, select_channels
from .solve import RECONSTRUCT, channel_error, cv_lstsq, lstsq, patch_error, scale
from .stats import ChannelStats, PatchStats
from .surgery import prune_unit

__all__ = ["MAX_PATCH_DIM", "PruneResult", "prune"]

#: Consumers whose patch length ``c*k`` exceeds this use channel-level statistics
#: (a ``c × c`` Gram) instead of a ``(c*k)²`` patch Gram; ``lstsq`` then becomes ``scale``.
MAX_PATCH_DIM = 6144
_ROWS_PER_UPDATE = 4096  # bound the float64 copy of a batch's patches
#: Folds (by image) of the statistics behind the cross-validated re-fit.
CV_FOLDS = 4
_FOLD_KEY = 0xF01D  # mixed into the seed of each image's fold


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes
    ----------
    model : nn.Module
        The pruned network (a new module unless ``inplace=True``).
    report : Report
        Per-layer errors and timings, FLOPs and parameters before and after.
    channels : dict of str to int
        Channels kept per unit (unit = producer layer name, or "<conv>.sampler" for the
        sampler layer in front of a residual branch).
    kept : dict of str to list of int
        Indices of the kept channels per unit, in the original numbering (for a sampler,
        the block-input channels its conv still reads).
    plan : dict
        What was done, as plain JSON-serialisable data: per unit its structure and kept
        channels, the sampler layers and their indices, the method, reconstruct mode,
        seed, target and options, recon and torch versions, and a format version.
        Unlike ``kept``, which numbers the channels of the model given to ``prune``,
        the plan numbers those of the *unpruned* network: when a pruned model is
        pruned again, its plan composes with the earlier one. Replay it on a fresh
        model with :func:`recon.apply_plan`; :func:`recon.save` stores it with the
        weights.
    """

    model: nn.Module
    report: Report
    channels: dict[str, int] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- checks


def _bad(name: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"The '{name}' argument must be {expected}. Got {got!r} instead.")


def _check_args(method, reconstruct, samples_per_image, max_images, seed, round_to) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise _bad("method", f"one of {METHODS}", method)
    if not isinstance(reconstruct, str) or reconstruct not in RECONSTRUCT:
        raise _bad("reconstruct", f"one of {RECONSTRUCT}", reconstruct)
    if samples_per_image is not None:
        if isinstance(samples_per_image, bool) or not isinstance(samples_per_image, int):
            raise TypeError(
                "The 'samples_per_image' argument must be an int >= 1 or None. "
                f"Got {samples_per_image!r} instead."
            )
        if samples_per_image < 1:
            raise _bad("samples_per_image", "an int >= 1 or None", samples_per_image)
    if max_images is not None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise _bad("max_images", "an int >= 1 or None", max_images)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _bad("seed", "an int >= 0", seed)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise _bad("round_to", "an int >= 1", round_to)


def _finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite (a float64 sum propagates NaN and inf)."""
    return bool(torch.isfinite(t.detach().sum(dtype=torch.float64)))


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be a torch.nn.Module. Got {type(model).__name__} instead."
        )
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(
                f"The 'model' argument has '{name}' on the meta device (no values); "
                "load its weights before pruning."
            )
        if t.is_floating_point() and not _finite(t):
            raise ValueError(
                f"The 'model' argument has non-finite values (NaN or inf) in '{name}'; "
                "recon cannot prune a model with broken weights."
            )


def _calibration_batches(calib: Any, max_images: int | None) -> list[Tensor]:
    """The calibration inputs as batches (as given, not moved or cast), no labels."""
    if isinstance(calib, Tensor):
        items: Iterable[Any] = [calib]
    elif isinstance(calib, str | bytes | Mapping) or not isinstance(calib, Iterable):
        raise TypeError(
            "The 'calib' argument must be a tensor, or an iterable (e.g. a DataLoader) of "
            f"tensors or (inputs, labels) tuples. Got {type(calib).__name__} instead."
        )
    else:
        items = calib
    batches: list[Tensor] = []
    seen = 0
    for i, item in enumerate(items):
        x = item[0] if isinstance(item, tuple | list) and len(item) > 0 else item
        if not isinstance(x, Tensor):
            raise TypeError(
                f"The 'calib' argument's item {i} must be a tensor or an (inputs, labels) "
                f"tuple. Got {type(item).__name__} instead."
            )
        if x.dim() < 2 or not x.is_floating_point():
            raise ValueError(
                f"The 'calib' argument's item {i} must be a floating-point batch of shape "
                f"(N, C, H, W). Got a {x.dtype} tensor of shape {tuple(x.shape)} instead."
            )
        if batches and x.shape[1:] != batches[0].shape[1:]:
            raise ValueError(
                f"The 'calib' argument's batches must all have the same per-image shape. "
                f"Got {tuple(batches[0].shape[1:])} and then {tuple(x.shape[1:])} (item {i})."
            )
        if not _finite(x):
            raise ValueError(
                f"The 'calib' argument's item {i} contains non-finite values (NaN or inf)."
            )
        if max_images is not None:
            x = x[: max_images - seen]
        if len(x):
            batches.append(x)
            seen += len(x)
        if max_images is not None and seen >= max_images:
            break
    if not batches:
        raise ValueError("The 'calib' argument must contain at least one image. Got no images.")
    return batches


def _shard(
    batches: list[Tensor], ctx: _dist.Context | None, sharded: bool, max_images: int | None
) -> tuple[list[Tensor], list[int]]:
    """This process's calibration batches and the global index of each one's first image.

    In one process that is every batch. In a distributed run either every rank was given
    the same images (``sharded=False``: they are checked to be the same, and rank ``r``
    keeps the ``r``-th of ``world`` contiguous parts), or each rank its own part
    (``sharded=True``: images are numbered rank by rank, ``max_images`` counts them all).
    """
    sizes = [b.shape[0] for b in batches]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    if ctx is None:
        return batches, starts
    if sharded:
        counts = [c[0] for c in ctx.gather_ints([total], "counting calibration images")]
        first = sum(counts[: ctx.rank])
        total = sum(counts)
        if max_images is not None:
            total = min(total, max_images)
        lo, hi = first, min(first + sum(sizes), total)
    else:
        acc = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            d = b.double()  # one float64 copy per batch, not two
            acc += torch.stack([d.sum(), d.square().sum()]).cpu()
        if not ctx.same([total, *acc.tolist()], "comparing calibration data"):
            raise ValueError(
                "The 'calib' argument differs between the processes of this distributed run. "
                "Give every rank the same images (recon splits them), or pass "
                "calib_sharded=True when each rank's loader yields its own part (e.g. "
                "with a DistributedSampler)."
            )
        lo, hi = _dist.shard_range(total, ctx.rank, ctx.world)
        first = 0
    mine, offsets = [], []
    for b, start in zip(batches, starts, strict=True):
        s = first + start  # global index of the batch's first image
        a, z = max(lo, s), min(hi, s + b.shape[0])
        if a < z:
            mine.append(b[a - s : z - s])
            offsets.append(a)
    return mine, offsets


def _fingerprint(model: nn.Module) -> list[float]:
    """A few float64 sums of the model's tensors: equal models give equal numbers."""
    total = torch.zeros(3, dtype=torch.float64)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            d = t.detach().double()
            total += torch.stack([d.sum(), d.square().sum(), torch.tensor(float(d.numel()))])
    return total.tolist()


def _check_layer_names(graph: Graph, **named: Any) -> None:
    """Give the reason when a named layer exists but is not a prunable unit."""
    for arg, value in named.items():
        if value is None or isinstance(value, int | float):
            continue
        names = [value] if isinstance(value, str) else list(value)
        for n in names:
            if n in graph.skipped:
                raise ValueError(
                    f"The '{arg}' argument names layer '{n}', which recon cannot prune: "
                    f"{graph.skipped[n]}."
                )


# --------------------------------------------------------------------------- statistics


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        return tuple(conv._reversed_padding_repeated_twice)  # (left, right, top, bottom)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    """Per-channel factor ``a`` of an eval-mode BatchNorm ``a * z + d``, in float64."""
    a = (bn.running_var.double() + bn.eps).rsqrt()
    return a * bn.weight.detach().double() if bn.affine else a


@dataclass
class _Target:
    """The block-sum target of a residual branch's last conv (He et al.).

    The block computes ``a * z + d + shortcut``; re-fitting the conv's output ``z`` to
    ``a * y + shortcut - shortcut'`` (original conv output ``y``, original and pruned
    shortcuts) in units of the block's sum reconstructs the sum, not the branch alone.
    """

    shortcut: str  # fx node name of the shortcut operand of the add
    scale: Tensor  # (n,) float64: a, the BatchNorm's per-channel factor (ones if none)


class _Rows:
    """Feeds samples to patch statistics in blocks of about ``_ROWS_PER_UPDATE`` rows.

    Small batches are joined into one float64 Gram update (fewer, larger BLAS calls);
    the grouping depends only on the batch sizes, so it is the same on every path.
    """

    def __init__(self, stats: PatchStats | ChannelStats) -> None:
        self.stats = stats
        # ChannelStats expand each row to (c, n) contributions: never join those.
        self.rows = _ROWS_PER_UPDATE if isinstance(stats, PatchStats) else 0
        self.xs: list[Tensor] = []
        self.ys: list[Tensor] = []
        self.fs: list[Tensor] = []
        self.count = 0

    def add(self, x: Tensor, y: Tensor, fold: Tensor | None = None, per_image: int = 1) -> None:
        """Queue samples ``x`` (R, d), ``y`` (R, n), ``per_image`` rows per image in
        order, and the fold of each image (None: one fold)."""
        self.xs.append(x)
        self.ys.append(y)
        if fold is not None:
            self.fs.append(fold.repeat_interleave(per_image))
        self.count += x.shape[0]
        if self.count >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.xs:
            return
        x = self.xs[0] if len(self.xs) == 1 else torch.cat(self.xs)
        y = self.ys[0] if len(self.ys) == 1 else torch.cat(self.ys)
        f = None if not self.fs else self.fs[0] if len(self.fs) == 1 else torch.cat(self.fs)
        self.xs, self.ys, self.fs, self.count = [], [], [], 0
        step = _ROWS_PER_UPDATE
        folds = getattr(self.stats, "folds", 1)
        for i in range(0, x.shape[0], step):
            if f is None or folds == 1:
                self.stats.update(x[i : i + step], y[i : i + step])
            else:
                self.stats.update(x[i : i + step], y[i : i + step], f[i : i + step])


def _image_folds(first: int, count: int, folds: int, seed: int) -> Tensor:
    """The fold of each of ``count`` images from global index ``first``: (count,) int64.

    A seeded hash of the image's global index, so a fold holds the same images
    whatever the batch size, the layer or the number of processes.
    """
    return torch.tensor(
        [_mix(seed, _FOLD_KEY, first + i) % folds for i in range(count)], dtype=torch.int64
    )


def _accumulate(
    unit: Unit,
    gm_o: fx.GraphModule,
    gm_p: fx.GraphModule,
    batches: list[Tensor],
    *,
    target: _Target | None,
    samples_per_image: int | None,
    seed: int,
    progress: bool,
    passes: Passes | None = None,
    step: int = 0,
    timer: PhaseTimer | None = None,
    folds: int = 1,
) -> PatchStats | ChannelStats:
    """One pass over the calibration set: X from the pruned net, Y from the original.

    ``passes`` (:class:`recon.passes.Passes`) supplies the original network's targets
    and runs the pruned network from its boundary cache, ``step`` being the unit's
    place in its list; without it, both networks run from the input for this unit.
    With ``folds > 1`` the patch statistics are kept per fold of images
    (:func:`_image_folds`), for the cross-validated re-fit.
    """
    timer = timer or PhaseTimer()
    if passes is None:
        shortcut = None if target is None else target.shortcut
        passes = Passes(
            gm_o,
            gm_p,
            batches,
            [unit],
            {unit.name: shortcut},
            [],
            samples_per_image=samples_per_image,
            seed=seed,
            cache_bytes=0,
            final=False,
            timer=timer,
        )
        step = 0
    consumer = gm_p.get_submodule(unit.consumer)
    weight = consumer.weight.detach()
    n = weight.shape[0]
    c, k = unit.width, unit.taps
    device = weight.device
    if c * k <= MAX_PATCH_DIM:
        stats: PatchStats | ChannelStats = PatchStats(c, k, n, device=device, folds=folds)
    else:
        w = weight.reshape(n, c, k)
        if target is not None:
            w = w * target.scale.to(device, w.dtype)[:, None, None]
        stats = ChannelStats(w, device=device)
    in_node = _node_of(gm_p, unit.consumer).args[0].name
    rows = _Rows(stats)
    bar = progress_bar(
        batches, desc=f"  {unit.name}", leave=False, disable=not progress, unit="batch", log="none"
    )
    for b, _ in enumerate(bar):
        orig = passes.original(step, b)
        got: dict[str, Tensor] = {}

        def on_input(x: Tensor, orig=orig, got=got) -> None:
            with timer("stats"):
                x = x.detach()
                if isinstance(consumer, SampledConv2d):
                    x = consumer.sampler(x)
                if unit.consumer_kind == "conv":
                    got["x"] = gather_patches(
                        x,
                        orig.positions,
                        kernel_size=consumer.kernel_size,
                        stride=consumer.stride,
                        padding=_conv_padding(consumer),
                        dilation=consumer.dilation,
                        out_width=orig.width,
                    )
                else:  # a copy: later in-place ops in the graph cannot change it
                    got["x"] = x.reshape(x.shape[0], -1).clone()

        def on_shortcut(v: Tensor, orig=orig, got=got) -> None:
            with timer("stats"):
                got["sc"] = gather_targets(v.detach(), orig.positions)

        watch = [(in_node, on_input)]
        if target is not None:
            watch.append((target.shortcut, on_shortcut))
        passes.pruned(step, b, watch)
        with timer("stats"):
            y = orig.y
            if target is not None:
                y = y * target.scale.to(y.device, y.dtype) + (orig.shortcut - got["sc"])
            images = batches[b].shape[0]
            fold = _image_folds(passes.offsets[b], images, folds, seed) if folds > 1 else None
            rows.add(got["x"], y, fold, got["x"].shape[0] // images)
    with timer("stats"):
        rows.flush()
    return stats


# --------------------------------------------------------------------------- one unit


def _prune_one(
    unit: Unit,
    target: int,
    stats: PatchStats | ChannelStats,
    pruned: nn.Module,
    *,
    method: str,
    reconstruct: str,
    seed: int,
    row_scale: Tensor | None = None,
    timer: PhaseTimer | None = None,
    ctx: _dist.Context | None = None,
) -> tuple[Tensor, LayerReport]:
    """Select ``target`` channels of ``unit`` from ``stats``, re-fit, and cut.

    With ``row_scale`` (a block-sum target), the statistics are in units of the block's
    sum: the consumer's output rows are scaled by it for selection and re-fitting, and
    the re-fitted rows scaled back. ``timer`` gets the select, solve and surgery times.
    In a distributed run (``ctx``), rank 0's channels and re-fitted weights are used
    by every rank.
    """
    t0 = time.perf_counter()
    timer = timer or PhaseTimer()
    timer.push("select")
    consumer = pruned.get_submodule(unit.consumer)
    n = consumer.weight.shape[0]
    w_cons = consumer.weight.detach().reshape(n, unit.width, unit.taps)  # (n, c, k)
    a = None
    if row_scale is not None:
        a = row_scale.to(w_cons.device)
        A, b = stats.channel_problem(w_cons.double() * a[:, None, None])
    else:
        A, b = stats.channel_problem(w_cons)
    if not (_finite(A) and _finite(b)):  # activations overflowed on some image
        raise FloatingPointError(
            f"the statistics of '{unit.consumer}' are not finite (NaN or inf): the "
            f"activations around it overflow {w_cons.dtype} on some calibration image"
        )
    scores = None
    note = "block target" if a is not None else ""
    if method == "l1" and unit.producer is not None:
        producer = pruned.get_submodule(unit.producer)
        scores = producer.weight.detach().abs().reshape(unit.width, -1).sum(1)
    elif method in ("l1", "max_response"):
        scores = w_cons.abs().sum(dim=(0, 2), dtype=torch.float64)
    keep = select_channels(
        method,
        target,
        A=A,
        b=b,
        scores=scores,
        width=unit.width,
        seed=_mix(seed, layer_key(unit.name)),
    ).to(A.device)
    if ctx is not None:
        keep = ctx.broadcast_(keep, f"channels of {unit.name}")
    err_before = channel_error(A, b, stats.yy, keep)
    timer.swap("solve")
    weight = bias_delta = None
    mode = reconstruct
    ridge = heldout = math.nan
    if mode in ("lstsq", "lstsq_plain") and isinstance(stats, ChannelStats):
        mode = "scale"
        note = _join(note, f"{reconstruct}->scale (c*k={unit.width * unit.taps} too wide)")
    if mode in ("lstsq", "lstsq_plain"):
        unknowns = int(keep.numel()) * unit.taps + 1
        if mode == "lstsq":
            w_units = w_cons.double() if a is None else w_cons.double() * a[:, None, None]
            fit = cv_lstsq(stats, keep, w_units)
            weight, bias_delta = fit.weight, fit.bias_delta
            ridge, heldout = fit.ridge, fit.heldout_error
            if math.isinf(ridge):
                note = _join(note, f"{fit.center} fit (held out, least squares did worse)")
            elif ridge > 0:
                note = _join(note, f"ridge to {fit.center}")
            done = (
                f"cross-validation chose a ridge of {ridge:g} towards the {fit.center} fit "
                f"(held-out error {heldout:.4g})"
            )
        else:
            weight, bias_delta = lstsq(stats, keep, fit_bias=True)
            done = "plain least squares may not generalise; reconstruct='lstsq' guards against this"
        if stats.count < unknowns:
            warnings.warn(
                f"re-fitting '{unit.consumer}' from {stats.count} samples for {unknowns} "
                f"unknowns per output is under-determined: {done}. More calibration images "
                "or samples_per_image give a better fit",
                stacklevel=3,
            )
        err_after = patch_error(stats, keep, weight, bias_delta)
        if a is not None:  # back from units of the block's sum to the conv's output
            live = a.abs() > 1e-12 * a.abs().max()
            safe = torch.where(live, a, torch.ones_like(a))
            old = w_cons[:, keep.to(w_cons.device)].reshape(n, -1).double()
            weight = torch.where(live[:, None], weight / safe[:, None], old)
            bias_delta = torch.where(live, bias_delta / safe, torch.zeros_like(bias_delta))
    elif mode == "scale":
        s = scale(A, b, keep)
        err_after = channel_error(A, b, stats.yy, keep, s)
        weight = w_cons[:, keep.to(w_cons.device)].double() * s.to(w_cons.device)[None, :, None]
    else:
        err_after = err_before
    if ctx is not None and weight is not None:
        weight = ctx.broadcast_(weight, f"weights of {unit.consumer}")
        if bias_delta is not None:
            bias_delta = ctx.broadcast_(bias_delta, f"bias of {unit.consumer}")
    if weight is not None and not _finite(weight):
        raise FloatingPointError(f"re-fitting '{unit.consumer}' produced non-finite weights")
    timer.swap("surgery")
    prune_unit(pruned, unit, keep.cpu(), weight=weight, bias_delta=bias_delta)
    timer.pop()
    report = LayerReport(
        name=unit.name,
        kind="sampler" if unit.kind == "sampler" else "conv",
        channels_before=unit.width,
        channels_after=int(keep.numel()),
        method=method,
        reconstruct=reconstruct,
        error_before=err_before,
        error_after=err_after,
        seconds=time.perf_counter() - t0,
        note=note,
        ridge=ridge,
        heldout_error=heldout,
    )
    return keep.cpu(), report


def _join(note: str, more: str) -> str:
    return f"{note}, {more}" if note else more


# --------------------------------------------------------------------------- public


def prune(
    model: nn.Module,
    calib: Tensor | Iterable[Any],
    *,
    method: str = "lasso",
    reconstruct: str = "lstsq",
    speedup: float | None = None,
    keep_ratio: float | Mapping[str, float] | None = None,
    channels: Mapping[str, int] | None = None,
    samples_per_image: int | None = 10,
    max_images: int | None = None,
    ignored_layers: Iterable[str] = (),
    round_to: int = 1,
    sampler_layers: bool = True,
    block_target: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    distributed: bool | None = None,
    calib_sharded: bool = False,
    inplace: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune the channels of a trained CNN in one shot, re-fitting each layer.

    Layers are pruned in forward order. For each prunable unit (a producer conv and the
    layer that reads its channels), the consumer's input patches ``x`` are taken from
    the partly pruned network and its outputs ``y`` from the original network, at the
    same seeded positions; their float64 sums give the channel problem from which
    ``method`` picks the channels to keep, and the consumer is re-fitted to minimise

    .. math:: \\sum \\|y - W' x_S - \\beta\\|^2

    (``reconstruct="lstsq"``). The producer's output channels, the BatchNorms between
    and the consumer's inputs are then removed physically.

    In a residual network the channels that meet in an ``add`` are never removed: the
    inner channels of each block are ordinary units, and a *sampler layer* in front of
    each branch's first conv lets the branch read only some of the block's input
    channels (He et al. 2017). The last conv of a branch is re-fitted against the
    block's sum, ``y_branch + y_shortcut - y'_shortcut``, so that the errors of the
    shortcut are compensated too.

    Parameters
    ----------
    model : nn.Module
        A trained network built from standard layers (traceable by ``torch.fx``).
        It is not modified unless ``inplace=True``.
    calib : Tensor or iterable
        Calibration images: a tensor (N, C, H, W), or an iterable (e.g. a DataLoader)
        of such tensors or of ``(inputs, labels)`` tuples; labels are ignored.
    method : {"lasso", "thinet", "l1", "max_response", "first_k", "random"}
        Channel selection (He et al. 2017 LASSO, Luo et al. 2017 ThiNet greedy, or a
        baseline).
    reconstruct : {"lstsq", "lstsq_plain", "scale", "none"}
        Re-fit the consumer. ``"lstsq"``: least squares with its bias and a ridge
        towards a safe fit (ThiNet's per-channel scaling of the kept channels, or their
        original weights), the ridge's strength chosen per layer by 4-fold
        cross-validation over the calibration images (:func:`recon.solve.cv_lstsq`;
        the statistics are kept per fold, 4 Grams instead of 1), so that a layer with
        too few samples for its unknowns gets the safe fit rather than an over-fitted
        one. ``"lstsq_plain"``: plain least squares (the default before the
        cross-validated fit; it over-fits with few calibration images). ``"scale"``:
        ThiNet's per-channel scaling. ``"none"``: no re-fit.
    speedup, keep_ratio, channels
        Exactly one target: a FLOPs ratio original/pruned (>= 1); a keep ratio in (0, 1]
        for every unit or a dict unit name -> ratio; or a dict unit name -> channels.
        Unit names are the producer layers' qualified names (``"features.0"``).
    samples_per_image : int or None, default 10
        Output positions sampled per image and layer; None for every position.
    max_images : int, optional
        Use at most this many calibration images.
    ignored_layers : iterable of str
        Units never pruned.
    round_to : int, default 1
        Channel counts are rounded to a multiple of this (or the full width).
    sampler_layers : bool, default True
        Put sampler layers in front of residual branches (units named
        ``"<first conv>.sampler"``); False prunes only the blocks' inner channels.
    block_target : bool, default True
        Re-fit the last conv of each residual branch against the block's sum (branch
        plus shortcut, compensating the shortcut's error) rather than the branch alone.
    seed : int, default 0
        Seeds position sampling and the ``random`` method.
    device : str or torch.device, optional
        Where to run; defaults to the model's device.
    cache_bytes : int, default 2**30 (1 GiB)
        Memory (on ``device``) recon may use to keep activations between units: first
        the original network's outputs at the sampled positions for every unit,
        gathered in one pass (positions × channels per unit), then the partly pruned
        network's activations at the current layer boundary, so that each unit runs
        the network from there instead of from the input. What does not fit is
        recomputed from the input (0: everything is). The pruned model is the same
        whatever the budget; only speed changes. See :mod:`recon.passes`.
    distributed : bool or None, default None
        Split the calibration work over the processes of ``torch.distributed`` (see
        :mod:`recon.distributed`). None: do so when its default process group is
        initialised with more than one process (e.g. under ``torchrun``); True: require
        that; False: ignore it (each process prunes on its own). Every rank must call
        ``prune`` with the same model and arguments. Each rank accumulates the
        statistics of its share of the images, the sums are all-reduced, and every
        rank ends with the same pruned model, equal to the one-process result up to
        the order of floating-point sums. An error on one rank stops every rank with
        an error naming it.
    calib_sharded : bool, default False
        Distributed only. False: every rank passes the same ``calib`` (checked) and
        rank ``r`` of ``w`` uses the ``r``-th of ``w`` contiguous parts. True: each rank
        passes its own part (e.g. a DataLoader with a ``DistributedSampler``); images
        are numbered rank by rank, so the result depends on how they were split, and
        ``max_images`` counts the images of all ranks.
    inplace : bool, default False
        Prune ``model`` itself instead of a copy.
    progress : bool, default True
        Show tqdm progress bars (on rank 0 only, in a distributed run).

    Returns
    -------
    PruneResult
        ``.model``, ``.report``, ``.channels``, ``.kept``.

    Raises
    ------
    ValueError
        For a bad argument, or a model with a pattern recon does not support (grouped
        or depthwise convolutions, a residual add of two conv branches), before any
        calibration work.

    Examples
    --------
    >>> import torch, recon
    >>> from recon.models import vgg11
    >>> net = vgg11(width=0.125).eval()
    >>> result = recon.prune(net, torch.randn(128, 3, 32, 32), keep_ratio=0.5, progress=False)
    >>> result.model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    t_start = time.perf_counter()
    if isinstance(ignored_layers, str):
        ignored_layers = (ignored_layers,)
    elif isinstance(ignored_layers, Iterable):
        ignored_layers = tuple(ignored_layers)  # a generator is read once only
    else:
        raise TypeError(
            "The 'ignored_layers' argument must be an iterable of layer names. "
            f"Got {type(ignored_layers).__name__} instead."
        )
    _check_args(method, reconstruct, samples_per_image, max_images, seed, round_to)
    _check_model(model)
    for arg, value in (
        ("inplace", inplace),
        ("sampler_layers", sampler_layers),
        ("block_target", block_target),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"The '{arg}' argument must be a bool. Got {value!r} instead.")
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise _bad("cache_bytes", "an int >= 0 (bytes)", cache_bytes)
    try:
        dev = torch.device(device) if device is not None else model_device(model)
        if device is not None:
            torch.empty(0, device=dev)  # a device this torch cannot use fails here
    except (RuntimeError, TypeError, AssertionError, NotImplementedError) as exc:
        raise _bad(
            "device", f"a torch device such as 'cpu' or 'cuda:0' usable here ({exc})", device
        ) from exc
    if dev.type == "meta":
        raise _bad("device", "a device with data such as 'cpu' or 'cuda:0'", device)
    ctx = _dist.context(distributed)
    if not isinstance(calib_sharded, bool):
        raise TypeError(
            f"The 'calib_sharded' argument must be a bool. Got {calib_sharded!r} instead."
        )
    show = progress and (ctx is None or ctx.rank == 0)
    # In a distributed run, an error on one rank is passed on to the others (no hang).
    with ctx.guard("pruning") if ctx is not None else contextlib.nullcontext():
        graph = find_units(model)
        if graph.unsupported:
            where, why = next(iter(graph.unsupported.items()))
            more = len(graph.unsupported) - 1
            raise ValueError(
                f"recon cannot prune this {type(model).__name__}: at '{where}', {why}"
                + (f" (and {more} more such place(s))" if more else "")
                + ". No channels were removed."
            )
        if not sampler_layers:
            graph.units = [u for u in graph.units if u.kind != "sampler"]
        given = _calibration_batches(calib, None if calib_sharded else max_images)
        example = given[0][:1].to(dev, model_dtype(model))  # the first image (of this rank)
        local, offsets = _shard(given, ctx, calib_sharded, max_images)
        batches = [b.to(dev, model_dtype(model)) for b in local]  # (B, C, H, W) each
        del given, local
        if ctx is not None and not ctx.same(_fingerprint(model), "comparing models"):
            raise ValueError(
                "The 'model' argument differs between the processes of this distributed "
                "run: load the same weights on every rank before pruning."
            )
        if not graph.units:
            reasons = "; ".join(f"'{k}': {v}" for k, v in list(graph.skipped.items())[:5])
            raise ValueError(
                f"recon found no prunable layers in {type(model).__name__}"
                + (f" ({reasons})" if reasons else " (it has no Conv2d layers)")
            )
        _check_layer_names(
            graph, keep_ratio=keep_ratio, channels=channels, ignored_layers=ignored_layers
        )

        modes = {name: m.training for name, m in model.named_modules()}
        original = copy.deepcopy(model).to(dev).eval()
        try:
            with torch.no_grad():
                out = original(example)
        except Exception as exc:
            raise ValueError(
                f"The 'calib' argument's images of shape {tuple(example.shape[1:])} do not fit the "
                f"model ({type(exc).__name__}: {exc})."
            ) from exc
        if isinstance(out, Tensor) and out.is_floating_point() and not _finite(out):
            raise ValueError(
                f"The 'model' argument computes non-finite values (NaN or inf) from the first "
                f"calibration image, in {model_dtype(model)}: its activations overflow. recon "
                "cannot fit layers to non-finite targets; prune it in float32. No channels "
                "were removed."
            )
        flops_before, module_flops = _budget.count_flops(original, example)
        budget_units = [
            _budget.BudgetUnit(u.name, u.width, (u.producer,) if u.producer else (), (u.consumer,))
            for u in graph.units
        ]
        targets = _budget.resolve_channels(
            budget_units,
            speedup=speedup,
            keep_ratio=keep_ratio,
            channels=channels,
            ignored_layers=ignored_layers,
            round_to=round_to,
            module_flops=module_flops,
            total_flops=flops_before,
        )
        params_before = _budget.count_params(original)

        # Everything above validates; only now is a model changed.
        pruned = model if inplace else copy.deepcopy(model)
        pruned.to(dev).eval()
        gm_o, gm_p = trace(original), trace(pruned)  # run node by node, sharing the modules
        layers: list[LayerReport] = []
        kept: dict[str, list[int]] = {}
        todo = [u for u in graph.units if targets[u.name] < u.width]
        timer = PhaseTimer(dev)
        shortcuts = {}
        for unit in todo:
            block = graph.block_of(unit.consumer) if block_target else None
            shortcuts[unit.name] = (
                block.shortcut if block is not None and block.linear_tail else None
            )
        bar = progress_bar(todo, desc="recon", disable=not show, unit="layer", log="each")
        with torch.no_grad():
            passes = Passes(
                gm_o,
                gm_p,
                batches,
                todo,
                shortcuts,
                graph.blocks,
                samples_per_image=samples_per_image,
                seed=seed,
                cache_bytes=cache_bytes,
                timer=timer,
                image_offsets=offsets,
            )
            for step, unit in enumerate(bar):
                bar.set_postfix_str(f"{unit.name} {unit.width}->{targets[unit.name]}")
                t0 = time.perf_counter()
                block = graph.block_of(unit.consumer) if block_target else None
                target = None
                if block is not None and block.linear_tail:
                    bn = block.bn and pruned.get_submodule(block.bn)
                    n_out = pruned.get_submodule(unit.consumer).out_channels
                    a = _bn_scale(bn) if bn else torch.ones(n_out, dtype=torch.float64, device=dev)
                    target = _Target(shortcut=block.shortcut, scale=a)
                stats = _accumulate(
                    unit,
                    gm_o,
                    gm_p,
                    batches,
                    target=target,
                    samples_per_image=samples_per_image,
                    seed=seed,
                    progress=show,
                    passes=passes,
                    step=step,
                    timer=timer,
                    folds=CV_FOLDS if reconstruct == "lstsq" else 1,
                )
                passes.drop_targets(step)
                if ctx is not None:  # sums over every rank's shard
                    with timer("communication"):
                        ctx.all_reduce_(stats.tensors(), f"statistics of {unit.name}")
                t_stats = time.perf_counter() - t0
                keep, row = _prune_one(
                    unit,
                    targets[unit.name],
                    stats,
                    pruned,
                    method=method,
                    reconstruct=reconstruct,
                    seed=seed,
                    row_scale=None if target is None else target.scale,
                    timer=timer,
                    ctx=ctx,
                )
                if unit.kind == "sampler":  # a new module: the traced copy must call it too
                    gm_p.set_submodule(unit.consumer, pruned.get_submodule(unit.consumer))
                row.seconds += t_stats
                layers.append(row)
                kept[unit.name] = keep.tolist()
                del stats
            reduce = None if ctx is None else (lambda v: ctx.sum(v, "final errors"))
            out_err, block_errors = passes.finish(reduce)
            del passes
        for unit in graph.units:  # units left whole keep every channel
            kept.setdefault(unit.name, list(range(unit.width)))
        kept = {u.name: kept[u.name] for u in graph.units}
        flops_after, _ = _budget.count_flops(pruned, example)
        for name, m in pruned.named_modules():
            if name in modes:
                m.train(modes[name])
        report = Report(
            layers=layers,
            flops_before=int(flops_before),
            flops_after=int(flops_after),
            params_before=int(params_before),
            params_after=int(_budget.count_params(pruned)),
            seconds=time.perf_counter() - t_start,
            method=method,
            reconstruct=reconstruct,
            output_error=out_err if out_err is not None and math.isfinite(out_err) else None,
            blocks=block_errors,
            phases=timer.report(time.perf_counter() - t_start),
        )
        counts = {u.name: targets[u.name] for u in graph.units}
        settings = {
            "method": method,
            "reconstruct": reconstruct,
            "seed": seed,
            "target": {"speedup": speedup, "keep_ratio": keep_ratio, "channels": channels},
            "options": {
                "ignored_layers": list(ignored_layers),
                "round_to": round_to,
                "samples_per_image": samples_per_image,
                "max_images": max_images,
                "sampler_layers": sampler_layers,
                "block_target": block_target,
            },
        }
        plan = make_plan(graph.units, kept, original, pruned, settings=settings)
        attach(pruned, plan)  # a copy: pruning the model again composes with it
        if ctx is not None:  # no rank returns while another has failed
            ctx.check("the end of pruning")
        return PruneResult(model=pruned, report=report, channels=counts, kept=kept, plan=plan)
