"""``recon.prune``: the pipeline of a pruning run, stage by stage.

:func:`prune` reads as its algorithm:

1. **validate** the arguments, the model and the calibration data, before any work
   (:mod:`recon._checks`), and find the units (:mod:`recon.graph`);
2. **allocate** the channels each unit keeps: uniformly for a target (:mod:`recon.budget`),
   or, with ``allocation="auto"``, from a **profile** of the original network
   (:mod:`recon.profile`) by a global solve (:mod:`recon.allocate`), or, with
   ``allocation="global"``, by one ranking of every channel's score (:mod:`recon.ranking`);
3. **prune each unit** in forward order: its statistics over the calibration passes
   (:mod:`recon.gather`, :mod:`recon.passes`), then select, re-fit and cut
   (:mod:`recon.refit`);
4. **finish**: the report (:mod:`recon.report`) and the plan (:mod:`recon._plan`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import budget as _budget
from . import distributed as _dist
from ._checks import (
    _bad,
    _calibration_batches,
    _check_args,
    _check_layer_names,
    _check_model,
    _fingerprint,
    _finite,
    _shard,
)
from ._plan import attach, make_plan
from ._progress import progress_bar
from ._timing import PhaseTimer
from ._utils import model_device, model_dtype
from .allocate import Allocation, allocate, cost_at
from .gather import (  # noqa: F401  (_image_folds, _accumulate: used by tests)
    CV_FOLDS,
    MAX_PATCH_DIM,
    _accumulate,
    _bn_scale,
    _image_folds,
    _Target,
    stats_tensors,
)
from .graph import Graph, Unit, find_units, trace
from .passes import DEFAULT_CACHE_BYTES, Passes
from .profile import profile_units
from .ranking import MIN_KEEP, check_floor, check_min_keep, global_channels
from .refit import _prune_one
from .report import AllocationReport, AllocationRow, LayerReport, Report
from .scores import check_scores, global_scores
from .select import SCORE_METHODS
from .surgery import input_channels

__all__ = ["ALLOCATIONS", "DEFAULT_ALLOCATION", "MAX_PATCH_DIM", "PruneResult", "prune"]

#: How ``speedup=`` is split into channels per unit (see :func:`prune`).
ALLOCATIONS = ("auto", "uniform", "global", "global_normalized")
#: The accepted ``block_dtype`` values and the dtype each names.
BLOCK_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}
#: The allocations that rank the channels' scores of every unit together, and how
#: each makes the scores of different units comparable (:func:`recon.scores.normalize`).
GLOBAL_ALLOCATIONS = {"global": "none", "global_normalized": "mean"}
#: ``allocation=None`` means this (measured in docs/allocation.md).
DEFAULT_ALLOCATION = "auto"


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


# --------------------------------------------------------------------------- public


# --------------------------------------------------------------------------- public


def prune(
    model: nn.Module,
    calib: Tensor | Iterable[Any],
    *,
    method: str = "obs",
    reconstruct: str = "lstsq",
    speedup: float | None = None,
    keep_ratio: float | Mapping[str, float] | None = None,
    channels: Mapping[str, int] | None = None,
    allocation: str | None = None,
    min_keep: float = MIN_KEEP,
    samples_per_image: int | None = 10,
    max_images: int | None = None,
    input_key: str | None = None,
    ignored_layers: Iterable[str] = (),
    round_to: int = 1,
    sampler_layers: bool = True,
    block_target: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    block_dtype: str | torch.dtype = "float64",
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

    (``reconstruct="lstsq"``). The producer's output channels, the BatchNorms and
    depthwise convs between and the consumer's inputs are then removed physically.

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
    calib : Tensor, ndarray, dict or iterable
        Calibration images: a tensor or numpy array (N, C, H, W), or an iterable (e.g. a
        DataLoader) of such batches or of ``(inputs, labels)`` tuples; labels are
        ignored. A batch may also be a dict (as Hugging Face datasets give them): its
        images are ``batch[input_key]``.
    method : {"obs", "lasso", "thinet", "l1", "max_response", "apoz", "bn_gamma", \
"first_k", "random"}, default "obs"
        Channel selection. ``"obs"``: remove one channel at a time, each time the one
        whose removal least raises the error that the consumer's least-squares re-fit
        leaves (the re-fitted objective itself, not a proxy; Optimal Brain Surgeon's
        update for a group of weights, :mod:`recon.obs`; with ``reconstruct="scale"``
        or ``"none"``, the error of ThiNet's per-channel scaling). ``"lasso"``: He et al.
        2017's LASSO on the channels' scales; ``"thinet"``: Luo et al. 2017's greedy
        removal on the original weights' error. The score methods keep the channels
        with the largest score (:mod:`recon.scores`): ``"l1"``, the producer filter's
        L1 norm (Li et al. 2017); ``"max_response"``, the L1 norm of the consumer
        weights reading the channel; ``"apoz"``, the fraction of non-zero values the
        consumer reads from the channel, over the calibration images (1 − APoZ, Hu et
        al. 2016; counted in the unit's statistics pass, no pass of its own);
        ``"bn_gamma"``, the
        ``|γ|`` of the BatchNorm after the producer (Network Slimming, Liu et al.
        2017; a unit without one is an error naming it).
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
    allocation : {"uniform", "auto", "global", "global_normalized"} or None, default None
        How ``speedup`` is split into channels per unit. ``"uniform"``: one keep ratio
        for every unit, scaled to meet the FLOPs target. ``"auto"``: profile the
        original network first (:mod:`recon.profile`: one pass for every unit's
        re-fitted error at every allowed count along the method's own order, converted
        to output error by a sensitivity from one backward pass; units whose re-fit
        has nearly as many unknowns as samples stay near the uniform count; the
        ``"profile"`` phase of the report), then choose the
        counts that minimise the summed predicted output error under the FLOPs
        target (:func:`recon.allocate.allocate`), within 2 % of it. ``"global"``
        (score methods only: ``l1``, ``max_response``, ``apoz``, ``bn_gamma``):
        Network Slimming's global threshold, one ranking of every channel's score in
        the original network across all units, the lowest removed until the FLOPs
        target is met within 2 % (:func:`recon.ranking.global_channels`; ``apoz``
        takes one forward pass of the original network for its scores). The raw
        scores are compared across layers, as Slimming compares ``|γ|``;
        ``"global_normalized"`` first divides each unit's scores by their mean
        (only their spread within a layer decides; for scores whose scale differs
        between layers, like the weight norms of ``l1``). ``round_to``,
        ``ignored_layers`` and sampler layers take part. None: ``DEFAULT_ALLOCATION``
        (``"auto"``, which lost less accuracy than ``"uniform"`` in every cell of
        docs/allocation.md). It applies to ``speedup`` only: ``keep_ratio`` and
        ``channels`` are explicit, and ``allocation="auto"`` or ``"global"`` with
        them is an error.
    min_keep : float in [0, 1), default 0.25
        ``allocation="global"`` and ``"global_normalized"`` only: every unit keeps at
        least this share of its channels (rounded up, and to ``round_to``) whatever
        its scores; 0 lets the threshold take a layer down to one channel, as Network
        Slimming does (docs/guide/baselines.md, "The floor": without it the threshold emptied
        the late layers of the shipped VGG-16s). A target the floor cannot reach, or a
        ``min_keep`` other than the default with another allocation, is an error.
    samples_per_image : int or None, default 10
        Output positions sampled per image and layer; None for every position.
    max_images : int, optional
        Use at most this many calibration images.
    input_key : str, optional
        The key of the images in dict batches. None: the dict's only tensor or array,
        else the first of ``"image"``, ``"pixel_values"``, ``"images"``, ``"inputs"``,
        ``"input"`` that it has.
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
    block_dtype : {"float64", "float32"} or torch.dtype, default "float64"
        The precision of each block's products in the statistics (``xᵀx`` and ``xᵀy``
        over at most 4,096 sampled rows, :class:`recon.stats.PatchStats`); the sums are
        float64 either way. ``"float32"`` takes single-precision BLAS, about a quarter
        off the statistics phase on a CPU, and on the shipped models (10,000 samples per
        layer) kept the same channels and accuracy as float64; but its rounding (~1e-6
        of the Gram) exceeds the solvers' ridge where a layer has fewer samples than
        patch entries, and the channels chosen there may then change with the batch
        split (docs/guide/speed.md, "float32 block products"). Use it with ample calibration data.
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
        Show progress (on rank 0 only, in a distributed run): a tqdm bar at a terminal,
        one line per pruned layer in a log.

    Returns
    -------
    PruneResult
        ``.model``, ``.report``, ``.channels``, ``.kept``.

    Raises
    ------
    ValueError
        For a bad argument, or a model with a pattern recon does not support (grouped
        convolutions, depthwise convolutions with a depth multiplier, a residual add of
        two conv branches), before any calibration work.

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
    ignored_layers, dev, ctx, allocation = _check_options(
        model,
        method=method,
        reconstruct=reconstruct,
        samples_per_image=samples_per_image,
        max_images=max_images,
        seed=seed,
        round_to=round_to,
        ignored_layers=ignored_layers,
        inplace=inplace,
        sampler_layers=sampler_layers,
        block_target=block_target,
        cache_bytes=cache_bytes,
        device=device,
        distributed=distributed,
        calib_sharded=calib_sharded,
        allocation=allocation,
        speedup=speedup,
        min_keep=min_keep,
        block_dtype=block_dtype,
    )
    block_dtype = BLOCK_DTYPES[block_dtype]
    show = progress and (ctx is None or ctx.rank == 0)
    # In a distributed run, an error on one rank is passed on to the others (no hang).
    with ctx.guard("pruning") if ctx is not None else contextlib.nullcontext():
        net = _prepare(
            model,
            calib,
            dev,
            ctx,
            sampler_layers=sampler_layers,
            calib_sharded=calib_sharded,
            max_images=max_images,
            input_key=input_key,
            keep_ratio=keep_ratio,
            channels=channels,
            ignored_layers=ignored_layers,
        )
        timer = PhaseTimer(dev)
        targets, alloc = _allocate_channels(
            net,
            timer,
            ctx,
            show,
            speedup=speedup,
            keep_ratio=keep_ratio,
            channels=channels,
            ignored_layers=ignored_layers,
            round_to=round_to,
            allocation=allocation,
            min_keep=min_keep,
            method=method,
            reconstruct=reconstruct,
            samples_per_image=samples_per_image,
            seed=seed,
            cache_bytes=cache_bytes,
            block_dtype=block_dtype,
        )

        # Everything above validates (and only reads the model); only now is one changed.
        pruned = model if inplace else copy.deepcopy(model)
        pruned.to(dev).eval()
        done = _prune_units(
            net,
            pruned,
            targets,
            timer,
            ctx,
            show,
            method=method,
            reconstruct=reconstruct,
            samples_per_image=samples_per_image,
            seed=seed,
            cache_bytes=cache_bytes,
            block_target=block_target,
            block_dtype=block_dtype,
        )
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
                "allocation": allocation,
                "block_dtype": str(block_dtype).removeprefix("torch."),
                **({"min_keep": min_keep} if allocation in GLOBAL_ALLOCATIONS else {}),
            },
        }
        result = _finish(net, pruned, targets, done, alloc, timer, settings, t_start)
        if ctx is not None:  # no rank returns while another has failed
            ctx.check("the end of pruning")
        return result


# --------------------------------------------------------------------------- validate


def _check_options(
    model, *, method, reconstruct, samples_per_image, max_images, seed, round_to,
    ignored_layers, inplace, sampler_layers, block_target, cache_bytes, device,
    distributed, calib_sharded, allocation, speedup, min_keep, block_dtype,
) -> tuple[tuple[str, ...], torch.device, _dist.Context | None, str | None]:  # fmt: skip
    """Checks that need neither the graph nor the data: ignored layers (as a tuple),
    the device, the distributed context, and the allocation (None: no speedup)."""
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
    if allocation is not None and (
        not isinstance(allocation, str) or allocation not in ALLOCATIONS
    ):
        raise _bad("allocation", f"one of {ALLOCATIONS} or None", allocation)
    if allocation in ("auto", *GLOBAL_ALLOCATIONS) and speedup is None:
        raise ValueError(
            f"The 'allocation' argument {allocation!r} applies to a 'speedup' target only: "
            "'keep_ratio' and 'channels' say how many channels each unit keeps. Got "
            f"allocation={allocation!r} without speedup."
        )
    if allocation in GLOBAL_ALLOCATIONS and method not in SCORE_METHODS:
        raise ValueError(
            f"The 'allocation' argument {allocation!r} ranks per-channel scores across "
            f"units and needs a score method, one of {SCORE_METHODS}. Got "
            f"allocation={allocation!r} with method={method!r} instead."
        )
    check_min_keep(min_keep)
    if speedup is not None and allocation is None:
        allocation = DEFAULT_ALLOCATION
    if min_keep != MIN_KEEP and allocation not in GLOBAL_ALLOCATIONS:
        raise ValueError(
            "The 'min_keep' argument is the floor of the global allocations "
            f"({tuple(GLOBAL_ALLOCATIONS)}) only. Got min_keep={min_keep!r} with "
            f"allocation={allocation!r}."
        )
    if not isinstance(block_dtype, str | torch.dtype) or block_dtype not in BLOCK_DTYPES:
        raise _bad(
            "block_dtype", "'float32', 'float64', torch.float32 or torch.float64", block_dtype
        )
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
    return ignored_layers, dev, ctx, allocation


@dataclass
class _Network:
    """The network to prune as the stages see it, once validated."""

    graph: Graph
    original: nn.Module  # an eval-mode copy on the device, never changed
    batches: list[Tensor]  # this process's calibration batches, (B, C, H, W) each
    offsets: list[int]  # global index of each batch's first image
    example: Tensor  # (1, C, H, W): the first image, for FLOPs counting
    modes: dict[str, bool]  # training flag of each module of the model given
    budget_units: list[_budget.BudgetUnit]
    module_flops: dict[str, int]
    flops_before: int
    params_before: int


def _budget_unit(unit: Unit, model: nn.Module) -> _budget.BudgetUnit:
    """The unit as the budget sees it: the producer and the depthwise convs between
    scale on their output side, the consumer (and every other reader) on its input side."""
    depthwise = [n for n in unit.channelwise if isinstance(model.get_submodule(n), nn.Conv2d)]
    out = (unit.producer, *depthwise) if unit.producer else ()
    readers = (unit, *unit.readers)
    ins = tuple(r.consumer for r in readers)
    shares = [  # a reader of a concatenation holds a slice of its input
        1.0 if r.cat_lead is None else r.width / input_channels(model.get_submodule(r.consumer), r)
        for r in readers
    ]
    if unit.gate is not None:  # the squeeze reads the channels, the excitation writes them
        ins, out, shares = (*ins, unit.gate[0]), (*out, unit.gate[1]), [*shares, 1.0]
    return _budget.BudgetUnit(
        unit.name, unit.width, out, ins, step=unit.step, in_shares=tuple(shares)
    )


def _prepare(
    model, calib, dev, ctx, *, sampler_layers, calib_sharded, max_images, input_key,
    keep_ratio, channels, ignored_layers,
) -> _Network:  # fmt: skip
    """Find the units, take the calibration data, and check the model runs on it."""
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
    given = _calibration_batches(calib, None if calib_sharded else max_images, input_key)
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
    budget_units = [_budget_unit(u, original) for u in graph.units]
    params_before = _budget.count_params(original)
    return _Network(
        graph,
        original,
        batches,
        offsets,
        example,
        modes,
        budget_units,
        module_flops,
        int(flops_before),
        int(params_before),
    )


# --------------------------------------------------------------------------- allocate


def _allocate_channels(
    net: _Network, timer, ctx, show, *, speedup, keep_ratio, channels, ignored_layers,
    round_to, allocation, min_keep, method, reconstruct, samples_per_image, seed,
    cache_bytes, block_dtype,
) -> tuple[dict[str, int], AllocationReport | None]:  # fmt: skip
    """Channels per unit: the target resolved uniformly, (``"auto"``) allocated from a
    profile of the original network, or (``"global"``) by one ranking of the channels'
    scores; and what the allocation report shows."""
    uniform = _budget.resolve_channels(
        net.budget_units,
        speedup=speedup,
        keep_ratio=keep_ratio,
        channels=channels,
        ignored_layers=ignored_layers,
        round_to=round_to,
        module_flops=net.module_flops,
        total_flops=net.flops_before,
    )
    ignored = set(ignored_layers)
    free = [u for u in net.graph.units if u.name not in ignored]
    # Before any calibration work: every unit that may lose channels has a score.
    check_scores(
        method, [u for u in free if speedup is not None or uniform[u.name] < u.width], net.original
    )
    if allocation in GLOBAL_ALLOCATIONS:
        check_floor(  # before any score is computed
            net.budget_units,
            speedup=speedup,
            module_flops=net.module_flops,
            total_flops=net.flops_before,
            ignored_layers=ignored,
            round_to=round_to,
            min_keep=min_keep,
        )
        with timer("allocate"):
            scores = global_scores(method, free, net.original, net.batches, ctx)
            targets = global_channels(
                net.budget_units,
                scores,
                speedup=speedup,
                module_flops=net.module_flops,
                total_flops=net.flops_before,
                ignored_layers=ignored,
                round_to=round_to,
                normalization=GLOBAL_ALLOCATIONS[allocation],
                min_keep=min_keep,
            )
        return _agreed(targets, net, ctx), None
    if allocation != "auto" or all(uniform[u.name] >= u.width for u in free):
        return uniform, None  # (a target every unit meets whole: nothing to allocate)
    with timer("profile"):
        prof = profile_units(
            net.original,
            trace(net.original),
            free,
            net.batches,
            net.offsets,
            uniform,
            method=method,
            reconstruct=reconstruct,
            round_to=round_to,
            samples_per_image=samples_per_image,
            seed=seed,
            cache_bytes=cache_bytes,
            block_dtype=block_dtype,
            ctx=ctx,
            show=show,
        )
        curves = prof.curves()
        alloc = _allocate_trusted(net, curves, prof, uniform, speedup, ignored, round_to)
    targets = _agreed(alloc.channels, net, ctx)
    at_uniform = cost_at(curves, uniform)
    at_chosen = cost_at(curves, targets)
    rows = [
        AllocationRow(
            name=u.name,
            width=u.width,
            uniform=uniform[u.name],
            chosen=targets[u.name],
            sensitivity=prof.units[u.name].sensitivity,
            cost_uniform=at_uniform[u.name],
            cost=at_chosen[u.name],
            counts=curves[u.name][0].tolist(),
            costs=curves[u.name][1].tolist(),
            trust=prof.units[u.name].trust,
        )
        for u in free
    ]
    report = AllocationReport(
        mode="auto",
        rows=rows,
        images=prof.images,
        heldout_images=prof.heldout,
        flops_uniform=_budget.predict_flops(
            net.budget_units, uniform, net.module_flops, net.flops_before
        ),
        flops_chosen=alloc.flops,
        solver=alloc.solver,
    )
    return targets, report


def _allocate_trusted(net: _Network, curves, prof, uniform, speedup, ignored, round_to):
    """:func:`recon.allocate.allocate` on the counts each unit is trusted with; the uniform
    split where they cannot reach the target together (units so little trusted that the
    uniform counts, a little over the target, are all they may keep). A target that no
    counts at all can reach is the error of the whole grid."""
    kw = dict(
        speedup=speedup, module_flops=net.module_flops, total_flops=net.flops_before,
        ignored_layers=ignored, round_to=round_to,
    )  # fmt: skip
    try:
        return allocate(net.budget_units, curves, **kw)
    except ValueError:
        whole = {n: (p.counts, p.cost) for n, p in prof.units.items()}
        allocate(net.budget_units, whole, **kw)  # raises if the target is out of reach
    flops = _budget.predict_flops(net.budget_units, uniform, net.module_flops, net.flops_before)
    costs = cost_at(curves, uniform)
    return Allocation(
        dict(uniform), sum(costs.values()), costs, flops, net.flops_before / speedup, 0.0,
        "uniform (no trusted counts reach the target)",
    )  # fmt: skip


def _agreed(channels: dict[str, int], net: _Network, ctx) -> dict[str, int]:
    """``channels`` per unit; in a distributed run, rank 0's (every rank prunes to them)."""
    names = [u.name for u in net.graph.units]
    counts = torch.tensor([channels[n] for n in names], dtype=torch.int64)
    if ctx is not None:
        counts = ctx.broadcast_(counts, "channels per unit").cpu()
    return dict(zip(names, (int(c) for c in counts), strict=True))


# --------------------------------------------------------------------------- prune each unit


@dataclass
class _Pruned:
    """What pruning the units produced."""

    layers: list[LayerReport]
    kept: dict[str, list[int]]
    output_error: float | None
    block_errors: dict[str, float]


def _prune_units(
    net: _Network, pruned: nn.Module, targets: dict[str, int], timer, ctx, show, *,
    method, reconstruct, samples_per_image, seed, cache_bytes, block_target, block_dtype,
) -> _Pruned:  # fmt: skip
    """Prune every unit that loses channels, in forward order (see :func:`prune`)."""
    graph, dev = net.graph, net.example.device
    gm_o, gm_p = trace(net.original), trace(pruned)  # run node by node, sharing the modules
    layers: list[LayerReport] = []
    kept: dict[str, list[int]] = {}
    todo = [u for u in graph.units if targets[u.name] < u.width]
    blocks = {
        u.name: graph.block_of(u.consumer)
        if block_target and u.cat_lead is None and not u.readers
        else None
        for u in todo
    }
    shortcuts = {
        n: b.shortcut if b is not None and b.linear_tail else None for n, b in blocks.items()
    }
    bar = progress_bar(todo, desc="recon", disable=not show, unit="layer", log="each")
    with torch.no_grad():
        passes = Passes(
            gm_o,
            gm_p,
            net.batches,
            todo,
            shortcuts,
            graph.blocks,
            samples_per_image=samples_per_image,
            seed=seed,
            cache_bytes=cache_bytes,
            timer=timer,
            image_offsets=net.offsets,
        )
        for step, unit in enumerate(bar):
            bar.set_postfix_str(f"{unit.name} {unit.width}->{targets[unit.name]}")
            t0 = time.perf_counter()
            block, target = blocks[unit.name], None
            if block is not None and block.linear_tail:
                bn = block.bn and pruned.get_submodule(block.bn)
                n_out = pruned.get_submodule(unit.consumer).out_channels
                a = _bn_scale(bn) if bn else torch.ones(n_out, dtype=torch.float64, device=dev)
                target = _Target(shortcut=block.shortcut, scale=a)
            stats = _accumulate(
                unit,
                gm_o,
                gm_p,
                net.batches,
                target=target,
                samples_per_image=samples_per_image,
                seed=seed,
                progress=show,
                passes=passes,
                step=step,
                timer=timer,
                folds=CV_FOLDS if reconstruct == "lstsq" else 1,
                block_dtype=block_dtype,
                zeros=method == "apoz",  # the channels' zeros: only APoZ scores read them
            )
            passes.drop_targets(step)
            if ctx is not None:  # sums over every rank's shard
                with timer("communication"):
                    ctx.all_reduce_(stats_tensors(stats), f"statistics of {unit.name}")
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
            elif unit.consumer_kind == "heads":  # a new attention layer, likewise
                gm_p.set_submodule(unit.producer, pruned.get_submodule(unit.producer))
            passes.kept(step, keep)  # cached consumer inputs, sliced to the kept channels
            row.seconds += t_stats
            layers.append(row)
            kept[unit.name] = keep.tolist()
            del stats
        reduce = None if ctx is None else (lambda v: ctx.sum(v, "final errors"))
        out_err, block_errors = passes.finish(reduce)
    for unit in graph.units:  # units left whole keep every channel
        kept.setdefault(unit.name, list(range(unit.width)))
    kept = {u.name: kept[u.name] for u in graph.units}
    out_err = out_err if out_err is not None and math.isfinite(out_err) else None
    return _Pruned(layers, kept, out_err, block_errors)


# --------------------------------------------------------------------------- finish


def _finish(
    net: _Network, pruned: nn.Module, targets: dict[str, int], done: _Pruned,
    alloc: AllocationReport | None, timer: PhaseTimer, settings: dict[str, Any], t_start: float,
) -> PruneResult:  # fmt: skip
    """Count what is left, restore the modules' training flags, report, and plan."""
    flops_after, _ = _budget.count_flops(pruned, net.example)
    for name, m in pruned.named_modules():
        if name in net.modes:
            m.train(net.modes[name])
    report = Report(
        layers=done.layers,
        flops_before=net.flops_before,
        flops_after=int(flops_after),
        params_before=net.params_before,
        params_after=int(_budget.count_params(pruned)),
        seconds=time.perf_counter() - t_start,
        method=settings["method"],
        reconstruct=settings["reconstruct"],
        output_error=done.output_error,
        blocks=done.block_errors,
        phases=timer.report(time.perf_counter() - t_start),
        allocation=alloc,
    )
    counts = {u.name: targets[u.name] for u in net.graph.units}
    plan = make_plan(net.graph.units, done.kept, net.original, pruned, settings=settings)
    attach(pruned, plan)  # a copy: pruning the model again composes with it
    return PruneResult(model=pruned, report=report, channels=counts, kept=done.kept, plan=plan)
