"""The statistics of one unit over the calibration passes (:class:`recon.passes.Passes`).

For a unit, the consumer's input patches ``x`` at the sampled positions (from the
network given as "pruned") and its output ``y`` (from the original) are summed into
float64 statistics (:mod:`recon.stats`): patch Grams when the patch is short enough,
channel-level Grams otherwise, kept per fold of images for the cross-validated re-fit;
one accumulator per group for a grouped consumer (:class:`recon.stats.GroupedStats`).
A concatenated unit (:attr:`recon.graph.Unit.cat_lead`) owns a slice of the consumer's
input: its statistics are those of the slice's patches, with the target less what the
other channels give through the consumer's current weights, ``y - W_F x_F`` (the
weights on the slice are re-fitted, the others stay).
A unit with a squeeze-and-excitation gate also gets ``stats.gate``: its squeeze conv's
pooled input and own output, one sample per image, for the squeeze's re-fit
(:func:`recon.refit.gate_fit`). The same pass counts the exact zeros of each channel
of the activation the consumer reads (at every position, not only the sampled ones),
for APoZ.
This module sees traced graphs, modules and tensors; it knows nothing of selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ._progress import progress_bar
from ._timing import PhaseTimer
from .graph import Unit, _node_of, called
from .groups import group_slices
from .layers import SampledConv2d, head_outputs
from .passes import GraphRunner, Passes, consumer_target
from .sampling import (
    _mix,
    gather_patches,
    gather_targets,
    layer_key,
    sample_positions,
    tokens_as_map,
)
from .stats import ChannelStats, GroupedStats, PatchStats
from .surgery import channel_offset, consumer_weight

__all__ = ["CV_FOLDS", "MAX_PATCH_DIM", "accumulate_all", "stats_bytes"]

#: Consumers whose patch length ``c*k`` exceeds this use channel-level statistics
#: (a ``c × c`` Gram) instead of a ``(c*k)²`` patch Gram; ``lstsq`` then becomes ``scale``.
MAX_PATCH_DIM = 6144
_ROWS_PER_UPDATE = 4096  # rows per block product (and per float64 copy of the patches)
#: Folds (by image) of the statistics behind the cross-validated re-fit.
CV_FOLDS = 4
_FOLD_KEY = 0xF01D  # mixed into the seed of each image's fold


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

    def __init__(self, stats: PatchStats | ChannelStats | GroupedStats) -> None:
        self.stats = stats
        # ChannelStats expand each row to (c, n) contributions: never join those.
        parts = stats.parts if isinstance(stats, GroupedStats) else [stats]
        self.rows = _ROWS_PER_UPDATE if isinstance(parts[0], PatchStats) else 0
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


def _new_stats(
    weight: Tensor, target: _Target | None, outs: slice, folds: int, block_dtype: torch.dtype
) -> PatchStats | ChannelStats:
    """Empty statistics for a consumer (or one group of it) of ``weight`` (n, c, k):
    patch statistics when the patch is short enough, else channel-level ones."""
    n, c, k = weight.shape
    if c * k <= MAX_PATCH_DIM:
        return PatchStats(c, k, n, device=weight.device, folds=folds, block_dtype=block_dtype)
    if target is not None:
        weight = weight * target.scale[outs].to(weight.device, weight.dtype)[:, None, None]
    return ChannelStats(weight, device=weight.device)


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
    block_dtype: torch.dtype = torch.float64,
    zeros: bool = True,
) -> PatchStats | ChannelStats:
    """One pass over the calibration set: X from the pruned net, Y from the original.

    ``passes`` (:class:`recon.passes.Passes`) supplies the original network's targets
    and runs the pruned network from its boundary cache, ``step`` being the unit's
    place in its list; without it, both networks run from the input for this unit.
    With ``folds > 1`` the patch statistics are kept per fold of images
    (:func:`_image_folds`), for the cross-validated re-fit; ``block_dtype`` is the
    precision of each block's products (:class:`recon.stats.PatchStats`); ``zeros``
    whether the channels' exact zeros are counted (APoZ, for ``method="apoz"``).
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
    acc = _UnitStats(unit, gm_o, gm_p, target, folds, block_dtype, zeros)
    accs = acc.readers
    bar = progress_bar(
        batches, desc=f"  {unit.name}", leave=False, disable=not progress, unit="batch", log="none"
    )
    for b, _ in enumerate(bar):
        origs = [passes.original(step, b, i) for i in range(len(accs))]
        got: dict[str, Tensor] = {}

        def on_shortcut(v: Tensor, orig=origs[0], got=got) -> None:
            with timer("stats"):
                got["sc"] = gather_targets(v.detach(), orig.positions)

        def on_gate(v: Tensor, got=got) -> None:  # the pooled (B, c, 1, 1) gate input
            got["gate"] = v.detach().reshape(v.shape[0], -1).double()

        watch = [
            (a.in_node, a.on_input(orig, got, i, timer))
            for i, (a, orig) in enumerate(zip(accs, origs, strict=True))
        ]
        if target is not None:
            watch.append((target.shortcut, on_shortcut))
        if acc.gate is not None:
            watch.append((acc.gate_node, on_gate))
        passes.pruned(step, b, watch)
        with timer("stats"):
            images = batches[b].shape[0]
            fold = _image_folds(passes.offsets[b], images, folds, seed) if folds > 1 else None
            for i, (a, orig) in enumerate(zip(accs, origs, strict=True)):
                y = orig.y
                if i == 0 and target is not None:
                    y = y * target.scale.to(y.device, y.dtype) + (orig.shortcut - got["sc"])
                a.add(got[f"x{i}"], y, fold, images)
            if acc.gate is not None:
                acc.add_gate(got["gate"], fold)
    with timer("stats"):
        acc.flush()
    return acc.stats


def stats_bytes(unit: Unit, model: nn.Module, folds: int) -> int:
    """About the memory of ``unit``'s statistics (every reader's), in bytes."""
    total = 0
    for r in (unit, *unit.readers):
        n = model.get_submodule(r.consumer).weight.shape[0]
        c, k, G = r.width, r.taps, r.groups
        d = c * k // G
        if d <= MAX_PATCH_DIM:
            total += G * folds * (d * d + d * n // G) * 8
        else:
            total += G * ((c // G) ** 2 + n * d) * 8
    return total


def accumulate_all(
    units: list[Unit],
    gm: fx.GraphModule,
    batches: list[Tensor],
    offsets: list[int],
    *,
    samples_per_image: int | None,
    seed: int,
    folds: int = 1,
    block_dtype: torch.dtype = torch.float64,
    zeros: bool = True,
    timer: PhaseTimer | None = None,
) -> dict[str, PatchStats | ChannelStats | GroupedStats]:
    """The statistics of every unit of ``units`` in one pass of the network ``gm``.

    ``X`` and ``Y`` both come from ``gm`` (the original network, nothing pruned): each
    batch runs once, and every consumer's input patches and output at its sampled
    positions (the positions :class:`recon.passes.Passes` samples: the same seed,
    layer key and image index) are summed as :func:`_accumulate` sums them. The
    caller bounds the memory by the units it passes (:func:`stats_bytes`).
    """
    timer = timer or PhaseTimer()
    runner = GraphRunner(gm)
    accs = {u.name: _UnitStats(u, gm, gm, None, folds, block_dtype, zeros) for u in units}
    for b, xb in enumerate(batches):
        got: dict = {}
        watch: dict[int, list] = {}
        for u in units:
            acc = accs[u.name]
            for i, a in enumerate(acc.readers):
                _watch_reader(a, (u.name, i), got, watch, runner, gm, b, offsets[b],
                              samples_per_image, seed, timer)  # fmt: skip
            if acc.gate is not None:

                def on_gate(v: Tensor, key=(u.name, "gate"), got=got) -> None:
                    got[key] = v.detach().reshape(v.shape[0], -1).double()

                watch.setdefault(runner.index[acc.gate_node], []).append(on_gate)
        with timer("forward"):
            runner.run(xb, 0, max(watch, default=-1) + 1, watch=watch)
        with timer("stats"):
            images = xb.shape[0]
            fold = _image_folds(offsets[b], images, folds, seed) if folds > 1 else None
            for u in units:
                acc = accs[u.name]
                for i, a in enumerate(acc.readers):
                    a.add(got.pop((u.name, i, "x")), got.pop((u.name, i, "y")), fold, images)
                if acc.gate is not None:
                    acc.add_gate(got.pop((u.name, "gate")), fold)
    with timer("stats"):
        for acc in accs.values():
            acc.flush()
    return {name: acc.stats for name, acc in accs.items()}


def _watch_reader(a, key, got, watch, runner, gm, b, offset, per_image, seed, timer) -> None:
    """Watchers putting reader ``a``'s patches and targets of batch ``b`` into ``got``."""
    unit, consumer = a.unit, a.consumer
    out_node = runner.index[_node_of(gm, called(unit)).name]
    bias = None if consumer.bias is None else consumer.bias.detach()
    conv = unit.consumer_kind == "conv"
    tokens = unit.consumer_kind in ("tokens", "heads")
    layer = layer_key(unit.name)
    orig = _Where(None, None)

    def on_input(x: Tensor) -> None:
        if conv or tokens:  # the positions of the output map, from the input's size
            if conv:
                h, w = _out_size(consumer, x.shape[-2], x.shape[-1])
            else:  # a linear layer over the last dimension: a 1x1 conv of the tokens
                h, w = x[..., 0].numel() // x.shape[0], 1
            orig.width = w
            orig.positions = sample_positions(
                x.shape[0], h * w, per_image, seed=seed, layer=layer, image_offset=offset,
                device=x.device,
            )  # fmt: skip
        a.on_input(orig, got, key, timer)(x)

    def on_output(v: Tensor) -> None:
        with timer("stats"):
            v = v[0] if isinstance(v, tuple) else v  # attention: (output, weights)
            v = tokens_as_map(v) if tokens else v
            got[(*key, "y")] = consumer_target(v, bias, orig.positions)

    watch.setdefault(runner.index[a.in_node], []).append(on_input)
    watch.setdefault(out_node, []).append(on_output)


class _Where:
    """Sampled positions of one batch, as :class:`recon.passes.Original` holds them."""

    def __init__(self, positions: Tensor | None, width: int | None) -> None:
        self.positions, self.width = positions, width


def _out_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    left, right, top, bottom = _conv_padding(conv)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    return (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (
        w + left + right - dw * (kw - 1) - 1
    ) // sw + 1


class _UnitStats:
    """A unit's accumulators: one :class:`_ReaderStats` per conv reading its channels
    (its consumer's first; the others' statistics ride along as ``stats.readers``, for
    :mod:`recon.refit`) and, with a squeeze-and-excitation gate, its squeeze conv fc1's
    pooled input and own output (``stats.gate``, for fc1's re-fit on kept channels)."""

    def __init__(self, unit, gm_o, gm_p, target, folds, block_dtype, zeros) -> None:
        self.readers = [
            _ReaderStats(r, gm_o, gm_p, target if i == 0 else None, folds, block_dtype, zeros)
            for i, r in enumerate((unit, *unit.readers))
        ]
        self.stats = self.readers[0].stats
        if unit.readers:
            self.stats.readers = [a.stats for a in self.readers[1:]]
        self.gate = self.gate_node = None
        if unit.gate is not None:
            fc1 = gm_p.get_submodule(unit.gate[0])
            self.w_fc1 = fc1.weight.detach().reshape(fc1.out_channels, -1).double()
            self.gate_node = _node_of(gm_p, unit.gate[0]).args[0].name  # fx node name
            self.gate = PatchStats(
                unit.width, 1, fc1.out_channels, device=self.w_fc1.device, folds=folds
            )
            self.stats.gate = self.gate

    def add_gate(self, p: Tensor, fold: Tensor | None) -> None:
        """fc1's pooled input ``p`` (B, c) and its own output on it, before the cut."""
        self.gate.update(p, p @ self.w_fc1.T, 0 if fold is None else fold)

    def flush(self) -> None:
        for a in self.readers:
            a.rows.flush()


class _ReaderStats:
    """The statistics of one conv reading a unit's channels (its consumer, or another
    reader): its input patches on the unit's channels and its output target."""

    def __init__(
        self,
        unit: Unit,
        gm_o: fx.GraphModule,
        gm_p: fx.GraphModule,
        target: _Target | None,
        folds: int,
        block_dtype: torch.dtype,
        zeros: bool = True,
    ) -> None:
        self.unit = unit
        self.zeros = zeros  # count each channel's exact zeros (APoZ)
        self.consumer = consumer = gm_p.get_submodule(unit.consumer)
        weight = consumer.weight.detach()
        n = weight.shape[0]
        c, k = unit.width, unit.taps
        G = unit.groups
        self.off = channel_offset(gm_p, unit)
        if G > 1:  # one accumulator per group, on its own channels and outputs
            self.stats: PatchStats | ChannelStats | GroupedStats = GroupedStats(
                [
                    _new_stats(
                        weight[outs].reshape(n // G, c // G, k), target, outs, folds, block_dtype
                    )
                    for _, outs in group_slices(c, n, G)
                ],
                k,
            )
        else:
            w = consumer_weight(consumer, unit, self.off)
            self.stats = _new_stats(w, target, slice(None), folds, block_dtype)
        self.sliced = unit.cat_lead is not None
        if self.sliced:  # the consumer's weights on the other channels, (n, d_F)
            w_rest = weight.reshape(n, -1, k).double()
            off = self.off
            self.w_rest = torch.cat([w_rest[:, :off], w_rest[:, off + c :]], 1).reshape(n, -1)
            self.shift = _bias_shift(gm_o, gm_p, unit)
        self.in_node = _node_of(gm_p, called(unit)).args[0].name
        # attention heads: the consumer (the output projection) reads what the heads
        # compute from the attention layer's input
        self.attn = gm_p.get_submodule(unit.producer) if unit.consumer_kind == "heads" else None
        self.rows = _Rows(self.stats)

    def on_input(self, orig, got: dict, i, timer: PhaseTimer):
        """A watcher of the consumer's input that puts its patches in ``got["x<i>"]``
        (``got[(*i, "x")]`` for a tuple ``i``)."""
        slot = (*i, "x") if isinstance(i, tuple) else f"x{i}"
        unit, consumer, off, c = self.unit, self.consumer, self.off, self.unit.width

        def watch(x: Tensor) -> None:
            with timer("stats"):
                x = x.detach()
                if isinstance(consumer, SampledConv2d):
                    x = consumer.sampler(x)
                if self.attn is not None:  # (B, T, E) -> the heads' outputs (B, T, h·d)
                    x = head_outputs(self.attn, x)
                if unit.consumer_kind in ("tokens", "heads"):  # (B, ..., c) -> (B, c, P, 1)
                    x = tokens_as_map(x)
                own = x[:, off : off + c] if self.sliced else x
                if self.zeros:  # APoZ: every position, not only the sampled ones
                    self.stats.count_zeros(own)
                if unit.consumer_kind == "conv":
                    got[slot] = gather_patches(
                        x,
                        orig.positions,
                        kernel_size=consumer.kernel_size,
                        stride=consumer.stride,
                        padding=_conv_padding(consumer),
                        dilation=consumer.dilation,
                        out_width=orig.width,
                    )
                elif unit.consumer_kind in ("tokens", "heads"):  # the sampled tokens
                    got[slot] = gather_targets(x, orig.positions)
                else:  # a copy: later in-place ops in the graph cannot change it
                    got[slot] = x.reshape(x.shape[0], -1).clone()

        return watch

    def add(self, x: Tensor, y: Tensor, fold: Tensor | None, images: int) -> None:
        """Queue a batch's patches ``x`` and targets ``y``; a slice's target is less what
        the other channels give through the consumer's current weights."""
        if self.sliced:
            off, c, k = self.off, self.unit.width, self.unit.taps
            rest = torch.cat([x[:, : off * k], x[:, (off + c) * k :]], 1)
            x = x[:, off * k : (off + c) * k]
            y = y.double() - rest.double() @ self.w_rest.T - self.shift
        self.rows.add(x, y, fold, x.shape[0] // images)


def _bias_shift(gm_o: nn.Module, gm_p: nn.Module, unit: Unit) -> Tensor:
    """What earlier re-fits of the consumer added to its output, (n,) float64: the
    change of its bias, or of the running mean of the BatchNorm after it
    (:func:`recon.surgery.apply_bias_delta`). Zero unless the consumer is shared
    (concatenated units)."""
    mods = [gm.get_submodule(unit.consumer) for gm in (gm_o, gm_p)]
    orig, cur = (
        torch.zeros(m.weight.shape[0], dtype=torch.float64, device=m.weight.device)
        if m.bias is None
        else m.bias.detach().double()
        for m in mods
    )
    shift = cur - orig.to(cur.device)
    if unit.consumer_bn is not None:
        bn_o, bn_p = (gm.get_submodule(unit.consumer_bn) for gm in (gm_o, gm_p))
        if bn_p.running_mean is not None:
            rm_o = bn_o.running_mean.double().to(shift.device)
            shift = shift + rm_o - bn_p.running_mean.double().to(shift.device)
    return shift


def stats_tensors(stats: PatchStats | ChannelStats | GroupedStats) -> list[Tensor]:
    """A unit's summed tensors for all-reduce: its statistics', its gate's and its other
    readers', if any."""
    gate = getattr(stats, "gate", None)
    readers = getattr(stats, "readers", [])
    out = stats.tensors() + ([] if gate is None else gate.tensors())
    return out + [t for r in readers for t in r.tensors()]
