"""Forward passes over the calibration set for :func:`recon.prune`.

To prune unit ``i``, recon needs for every calibration batch the consumer's output
``y`` in the original network (at the sampled positions) and the consumer's input
``x`` in the partly pruned network. Computing both from the input for every unit
costs two prefix passes per unit. :class:`Passes` brings that down to about two
forward passes in all:

* **The original network's targets, in one pass.** The original never changes, so a
  single pass gathers what every unit will need from it: each consumer's output at
  that unit's sampled positions (bias removed), the shortcut values of block targets,
  and what the final errors compare against (each residual ``add`` at its sampled
  positions, and the network output). These are small: positions × channels per unit.
* **A boundary cache for the pruned network.** Pruning a unit changes only its own
  modules (producer, channel-wise ops between, consumer, BatchNorm after the
  consumer). So every node of the graph before the first module that unit ``i`` *or
  any later unit* changes -- the *safe cut* of step ``i`` -- already has its final
  value. The values live at a cut (computed before it, read at or after it) are kept
  per batch, and the next unit runs the graph from the cut rather than from the input
  (a :class:`GraphRunner` range).
* **Past the producer, one pruned pass.** The safe cut lies before unit ``i``'s
  producer, so the producer would run again once pruned: each layer twice, once at
  full width (to give the consumer's input ``x``) and once pruned. Instead, where it
  is safe (:meth:`Passes._late_cut`), the cut of step ``i`` is the *consumer*: the
  values live there are cached during unit ``i``'s own pass, and once the caller
  reports the kept channels (:meth:`Passes.kept`) the consumer's input is sliced to
  them. The producer and the ops between are channel-wise (BatchNorm, activations,
  pooling, depthwise convs), so the slice is what the pruned network computes there,
  up to the rounding of a conv run at another output width. Safe means: the unit has
  a producer (a sampler unit's cut is its consumer already), no later unit changes a
  node before the consumer, of the live values only the consumer's input depends on
  the producer, and no watched value (a block ``add``, a block target's shortcut)
  does. Elsewhere the step keeps the safe cut. With every batch cached, each layer of
  a VGG, ResNet or MobileNet then runs once per calibration image in each network
  (tests/test_single_pass.py counts them).

A cached run and one that recomputes a batch from the input (``cache_bytes=0``, or a
batch over the budget) therefore agree to float32 rounding, not bit for bit (on the
CPU measured they were identical); the same call with the same budget repeats bit for
bit. ``Passes(..., single_pass=False)`` (default :data:`_SINGLE_PASS`) keeps the older
scheme, the safe cut everywhere, whose cached and recomputed paths do exactly the same
arithmetic; benchmarks and tests compare the two.

``cache_bytes`` bounds what is held. The targets come first; if they do not fit, each
unit runs the original network from the input again (as without a cache). The
boundary values then fit batch by batch (at a consumer, at full width until sliced):
a batch that does not fit starts from the input at the next unit. Values are cloned
when cached, so in-place operations later in the graph (``ReLU(inplace=True)``,
``out += x``) cannot change them.

This module sees traced graphs, modules and tensors; it knows nothing of selection or
re-fitting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from ._timing import PhaseTimer
from .graph import Block, Unit, _node_of, called
from .sampling import gather_targets, layer_key, sample_positions, tokens_as_map

__all__ = ["DEFAULT_CACHE_BYTES", "GraphRunner", "Original", "Passes", "consumer_target"]

#: Default of ``recon.prune(cache_bytes=...)``: 1 GiB of cached activations.
DEFAULT_CACHE_BYTES = 1 << 30

#: Default of ``Passes(single_pass=...)``: cache past each unit's producer where safe.
#: False restores the older scheme (cut before the producer; each layer runs twice),
#: kept so that a benchmark or a test can compare the two in one process.
_SINGLE_PASS = True

Watch = Sequence[tuple[str, Callable[[Any], None]]]


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _slice_channels(value: Any, keep: Tensor, unit: Unit) -> Tensor | None:
    """``value`` (the consumer's input at full width) with only the ``keep`` channels.

    None when ``value`` is not shaped as expected (the caller then drops it).
    """
    if not isinstance(value, Tensor) or value.dim() < 2:
        return None
    keep = keep.to(value.device)
    if unit.consumer_kind == "conv" and value.dim() == 4 and value.shape[1] == unit.width:
        return value.index_select(1, keep)
    if unit.consumer_kind == "tokens" and value.shape[-1] == unit.width:
        return value.index_select(value.dim() - 1, keep)
    if unit.consumer_kind == "linear" and value.dim() == 2:
        if value.shape[1] == unit.width * unit.taps:  # flattened channel-major: (B, c*taps)
            rows = value.reshape(value.shape[0], unit.width, unit.taps)
            return rows.index_select(1, keep).reshape(value.shape[0], -1)
    return None


def _key(step: int, reader: int) -> tuple[int, ...]:
    """Where reader ``reader`` of unit ``step`` keeps its targets in a batch's entry."""
    return (step,) if reader == 0 else (step, reader)


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone(v) for v in value)
    return value


class GraphRunner:
    """Runs a range of a traced graph's nodes, starting from values already computed.

    Nodes are numbered in the graph's (topological) order. ``run(x, start, stop, env)``
    executes nodes ``start .. stop-1`` with ``env`` (node index -> value) holding every
    value *live* at ``start`` (computed before it and read at or after it); values are
    freed after their last use, as :class:`torch.fx.Interpreter` does.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        where = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = [
            max((where[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)
        ]
        self._frees: list[list[fx.Node]] = [[] for _ in self.nodes]
        for i, j in enumerate(self.last_use):
            self._frees[j].append(self.nodes[i])
        self._interp = fx.Interpreter(gm)

    def __len__(self) -> int:
        return len(self.nodes)

    def live(self, cut: int) -> list[int]:
        """Indices of the nodes computed before ``cut`` and read at or after it."""
        return [i for i in range(min(cut, len(self.nodes))) if self.last_use[i] >= cut]

    def module_nodes(self) -> dict[str, int]:
        """Index of the (first) node calling each module, by qualified module name."""
        out: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                out.setdefault(str(n.target), i)
        return out

    def run(
        self,
        x: Tensor,
        start: int,
        stop: int,
        env: dict[int, Any] | None = None,
        *,
        watch: dict[int, list[Callable[[Any], None]]] | None = None,
        snapshot_at: int | None = None,
    ) -> dict[int, Any] | None:
        """Run nodes ``start .. stop-1``; return the live values at ``snapshot_at``.

        Parameters
        ----------
        x : Tensor
            The network input (read only if the placeholder is in the range).
        env : dict of int to value, optional
            Values live at ``start`` (needed unless ``start == 0``).
        watch : dict of int to list of callables
            Called with a node's value right after it is computed (at once, from
            ``env``, for a node before ``start``).
        snapshot_at : int, optional
            A cut in ``start .. stop``: the values live there are returned, cloned.
        """
        interp = self._interp
        values: dict[fx.Node, Any] = {self.nodes[j]: v for j, v in (env or {}).items()}
        interp.env = values
        interp.args_iter = iter((x,))
        snap = None
        try:
            for i in sorted(j for j in (watch or {}) if j < start):  # computed earlier
                node = self.nodes[i]
                if node not in values:
                    raise RuntimeError(f"recon.passes: node '{node.name}' is not live at {start}")
                for fn in watch[i]:
                    fn(values[node])
            for i in range(start, stop):
                if i == snapshot_at:
                    snap = {j: _clone(values[self.nodes[j]]) for j in self.live(i)}
                node = self.nodes[i]
                value = interp.run_node(node)
                values[node] = value
                for fn in (watch or {}).get(i, ()):
                    fn(value)
                for dead in self._frees[i]:
                    values.pop(dead, None)
            if snapshot_at == stop:
                snap = {j: _clone(values[self.nodes[j]]) for j in self.live(stop)}
        finally:
            interp.env = {}
        return snap


def consumer_target(out: Tensor, bias: Tensor | None, positions: Tensor | None) -> Tensor:
    """A consumer's output ``out`` less its ``bias``, at the sampled ``positions`` ((B*S, n);
    None: a linear consumer, every row). A copy either way: later in-place ops in the
    graph cannot change it."""
    y = out.detach()
    if bias is not None:
        y = y - bias.view((1, -1) + (1,) * (y.dim() - 2))
    return y.clone() if positions is None else gather_targets(y, positions)


@dataclass
class Original:
    """What one unit needs from the original network, for one batch.

    Attributes
    ----------
    positions : Tensor, shape (B, S), or None
        Sampled flat output positions (None for a linear consumer: a row per image).
    width : int or None
        Width of the consumer's output map (to turn positions into rows and columns).
    y : Tensor, shape (B*S, n) or (B, n)
        The consumer's output at those positions, its bias removed.
    shortcut : Tensor, shape (B*S, n), or None
        The block target's shortcut operand at the same positions.
    """

    positions: Tensor | None
    width: int | None
    y: Tensor
    shortcut: Tensor | None = None


class Passes:
    """The calibration passes of one pruning run (see the module docstring).

    Parameters
    ----------
    gm_o, gm_p : fx.GraphModule
        Traces of the original and of the (partly) pruned network; node names agree.
    batches : list of Tensor
        Calibration batches, on the model's device.
    units : list of Unit
        The units to prune, in the order they will be pruned.
    shortcuts : dict of str to str or None
        Unit name -> fx node name of its block target's shortcut operand (or None).
    blocks : list of Block
        Residual blocks whose output errors :meth:`finish` measures.
    samples_per_image : int or None
    seed : int
    cache_bytes : int
        Budget for the original's targets plus the pruned network's boundary values.
    final : bool
        Whether :meth:`finish` will be called (keep the boundary after the last unit
        and the targets of the final errors).
    timer : PhaseTimer, optional
    image_offsets : sequence of int, optional
        Global index of each batch's first image (seeds its positions); by default
        the batches are numbered consecutively from 0. A process of a distributed run
        passes where its shard starts.
    single_pass : bool, optional
        Cache past each unit's producer where that is safe (see the module docstring);
        the caller then reports each unit's kept channels with :meth:`kept`. False: the
        older scheme, the cut before the producer. Default ``_SINGLE_PASS`` (True).
    """

    def __init__(
        self,
        gm_o: fx.GraphModule,
        gm_p: fx.GraphModule,
        batches: list[Tensor],
        units: list[Unit],
        shortcuts: dict[str, str | None],
        blocks: list[Block],
        *,
        samples_per_image: int | None,
        seed: int,
        cache_bytes: int,
        final: bool = True,
        timer: PhaseTimer | None = None,
        image_offsets: Sequence[int] | None = None,
        single_pass: bool | None = None,
    ) -> None:
        self.ro, self.rp = GraphRunner(gm_o), GraphRunner(gm_p)
        self.gm_o = gm_o
        self.batches = batches
        self.units = units
        self.blocks = blocks
        self.per_image, self.seed = samples_per_image, seed
        self.budget = cache_bytes
        self.final = final
        self.timer = timer or PhaseTimer()
        sizes = [xb.shape[0] for xb in batches]
        self.n_images = sum(sizes)
        if image_offsets is None:  # global index of each batch's first image
            self.offsets = [sum(sizes[:b]) for b in range(len(batches))]
        elif len(image_offsets) != len(batches):
            raise ValueError("recon.passes: one image offset per batch is needed")
        else:
            self.offsets = list(image_offsets)
        self._wants = [  # per unit, its consumer's and its other readers'
            [
                self._want(r, shortcuts.get(u.name) if j == 0 else None)
                for j, r in enumerate((u, *u.readers))
            ]
            for u in units
        ]
        self.single_pass = _SINGLE_PASS if single_pass is None else bool(single_pass)
        self.cuts, self._slices = self._plan_cuts(shortcuts)
        self._sliced = [s is None for s in self._slices]  # unit i's cached values final?
        self.step = 0
        self.frontier: list[dict[int, Any] | None] = [None] * len(batches)
        self._frontier_bytes = [0] * len(batches)
        self.held = 0  # bytes held: targets + boundary values
        self.peak_held = self.targets_bytes = 0
        self.targets: list[dict[Any, Any]] | None = None
        self._sums = {b.name: [0.0, 0.0] for b in blocks}
        self._out: list[float] | None = [0.0, 0.0]
        self.output_error: float | None = None
        self.block_errors: dict[str, float] = {}
        self._gather_targets()

    # ------------------------------------------------------------------ cuts

    def _plan_cuts(self, shortcuts: dict[str, str | None]) -> tuple[list[int], list[int | None]]:
        """Each step's cut, and the node to slice once its unit is pruned (or None).

        The safe cut of step ``i`` is the first node that unit ``i`` or a later unit
        changes. A unit whose cut may move to its consumer (:meth:`_late_cut`) has
        that cut instead, and the index of the consumer's input, to be sliced.
        """
        first = self.rp.module_nodes()
        starts = []
        for u in self.units:
            names = [u.producer, *u.channelwise, *(u.gate or ())]
            for r in (u, *u.readers):
                names += [r.consumer, r.consumer_bn, *r.cat_after]
            starts.append(min(first[n] for n in names if n is not None and n in first))
        safe = list(starts)
        for i in range(len(safe) - 2, -1, -1):
            safe[i] = min(safe[i], safe[i + 1])
        cuts: list[int] = []
        slices: list[int | None] = []
        for i, u in enumerate(self.units):
            later = safe[i + 1] if i + 1 < len(safe) else len(self.rp)
            late = self._late_cut(u, first, later, shortcuts.get(u.name))
            if self.single_pass and late is not None:
                cuts.append(late[0])
                slices.append(late[1])
            else:
                cuts.append(safe[i])
                slices.append(None)
        return [*cuts, len(self.rp)], slices

    def _late_cut(
        self, unit: Unit, first: dict[str, int], later: int, shortcut: str | None
    ) -> tuple[int, int] | None:
        """``(consumer node, consumer input node)`` if the cut may lie at the consumer.

        Safe when: the unit has a producer; no later unit changes a node before the
        consumer; of the values live at the consumer, only the consumer's input
        depends on the unit's producer (or the ops cut with it); and no value that
        depends on them before the consumer is watched (a block ``add`` or a
        shortcut). Slicing that input to the kept channels then gives what the pruned
        network computes there.
        """
        if unit.kind != "plain" or unit.producer is None or unit.consumer not in first:
            return None
        if unit.cat_lead is not None or unit.readers:  # other channels, other readers
            return None
        if unit.gate is not None:  # the gate's input is watched, before the consumer
            return None
        cut = first[unit.consumer]
        if cut > later:
            return None
        node = self.rp.nodes[cut]
        if len(node.args) != 1 or not isinstance(node.args[0], fx.Node) or node.kwargs:
            return None
        x = self.rp.index[node.args[0].name]
        changed = [first[n] for n in (unit.producer, *unit.channelwise) if n in first]
        if len(changed) != 1 + len(unit.channelwise):
            return None
        down = self._downstream(changed, cut)
        if [j for j in self.rp.live(cut) if j in down] != [x]:
            return None
        watched = {self.rp.index[b.add] for b in self.blocks}
        if shortcut is not None:
            watched.add(self.rp.index[shortcut])
        return None if watched & down else (cut, x)

    def _downstream(self, nodes: list[int], stop: int) -> set[int]:
        """Nodes before ``stop`` computed from any of ``nodes`` (themselves included)."""
        todo, seen = list(nodes), set(nodes)
        while todo:
            for user in self.rp.nodes[todo.pop()].users:
                j = self.rp.index[user.name]
                if j < stop and j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    def kept(self, step: int, keep: Tensor | None) -> None:
        """Unit ``step`` now keeps the channels ``keep`` (None: it was left whole).

        With a cut past the unit's producer, the cached consumer inputs are sliced to
        ``keep`` (a batch whose value is not shaped as expected is dropped from the
        cache and recomputed from the input). Call it before the next step.
        """
        x = self._slices[step]
        if self._sliced[step] or x is None:
            self._sliced[step] = True
            return
        self._sliced[step] = True
        if keep is None:
            return
        keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
        unit = self.units[step]
        with self.timer("forward"):
            for b, env in enumerate(self.frontier):
                if env is None or x not in env:
                    continue
                value = _slice_channels(env[x], keep, unit)
                self.held -= self._frontier_bytes[b]
                if value is None:
                    self.frontier[b], self._frontier_bytes[b] = None, 0
                    continue
                env[x] = value
                self._frontier_bytes[b] = _nbytes(env)
                self.held += self._frontier_bytes[b]

    def _check_kept(self, step: int) -> None:
        if step > 0 and not self._sliced[step - 1]:
            name = self.units[step - 1].name
            raise RuntimeError(
                f"recon.passes: kept() not called for unit '{name}' (step {step - 1})"
            )

    # ------------------------------------------------------------------ original side

    def _want(self, unit: Unit, shortcut: str | None) -> tuple[int, int | None, Tensor | None]:
        out = self.ro.index[_node_of(self.gm_o, called(unit)).name]
        sc = None if shortcut is None else self.ro.index[shortcut]
        bias = self.gm_o.get_submodule(unit.consumer).bias
        return out, sc, None if bias is None else bias.detach()

    def _positions(self, b: int, value: Tensor, key: int) -> Tensor:
        return sample_positions(
            value.shape[0],
            value.shape[2] * value.shape[3],
            self.per_image,
            seed=self.seed,
            layer=key,
            image_offset=self.offsets[b],
            device=value.device,
        )

    def _unit_watch(self, b: int, i: int, entry: dict[Any, Any]) -> dict[int, list]:
        """Watchers that put unit ``i``'s :class:`Original` parts into ``entry`` (one per
        reader of the unit: its consumer's under ``(kind, i)``, reader ``j``'s under
        ``(kind, i, j)``)."""
        unit = self.units[i]
        watch: dict[int, list] = {}
        for j, (reader, (out, sc, bias)) in enumerate(
            zip((unit, *unit.readers), self._wants[i], strict=True)
        ):
            for k, fns in self._reader_watch(b, _key(i, j), reader, out, sc, bias, entry).items():
                watch.setdefault(k, []).extend(fns)
        return watch

    def _reader_watch(self, b, at, unit, out, sc, bias, entry) -> dict[int, list]:
        key = layer_key(unit.name)
        conv = unit.consumer_kind in ("conv", "tokens", "heads")
        tokens = unit.consumer_kind in ("tokens", "heads")

        def pos(v: Tensor) -> Tensor | None:
            if not conv:
                return None
            if ("pos", *at) not in entry:  # shortcut and output share the positions
                entry[("pos", *at)] = self._positions(b, v, key)
                entry[("width", *at)] = v.shape[3]
            return entry[("pos", *at)]

        def on_out(v: Tensor) -> None:
            with self.timer("stats"):
                v = v[0] if isinstance(v, tuple) else v  # attention: (output, weights)
                v = tokens_as_map(v) if tokens else v  # (B, ..., n) -> (B, n, P, 1)
                entry[("y", *at)] = consumer_target(v, bias, pos(v))

        def on_sc(v: Tensor) -> None:
            with self.timer("stats"):
                entry[("sc", *at)] = gather_targets(v.detach(), pos(v))

        watch: dict[int, list] = {out: [on_out]}
        if sc is not None:
            watch.setdefault(sc, []).append(on_sc)
        return watch

    def _final_watch(self, b: int, entry: dict[Any, Any]) -> dict[int, list]:
        """Watchers that put the final errors' references into ``entry``."""
        watch: dict[int, list] = {}
        for block in self.blocks:

            def on_add(v: Tensor, name: str = block.add) -> None:
                with self.timer("stats"):
                    p = self._positions(b, v, layer_key(name))
                    entry[("add", name)] = (p, gather_targets(v.detach(), p).double())

            watch.setdefault(self.ro.index[block.add], []).append(on_add)

        def on_output(v: Any) -> None:
            entry["output"] = v.detach() if isinstance(v, Tensor) else None

        watch.setdefault(len(self.ro) - 1, []).append(on_output)
        return watch

    def _original_pass(self, b: int) -> dict[Any, Any]:
        entry: dict[Any, Any] = {}
        watch: dict[int, list] = {}
        for i in range(len(self.units)):
            for k, fns in self._unit_watch(b, i, entry).items():
                watch.setdefault(k, []).extend(fns)
        stop = max(watch, default=-1) + 1
        if self.final:
            for k, fns in self._final_watch(b, entry).items():
                watch.setdefault(k, []).extend(fns)
            stop = len(self.ro)
        with self.timer("forward"):
            self.ro.run(self.batches[b], 0, stop, watch=watch)
        return entry

    def _gather_targets(self) -> None:
        """One pass of the original network for every unit, if the targets fit."""
        if self.budget <= 0 or not self.batches:
            return
        first = self._original_pass(0)
        per_image = _nbytes(first) / self.batches[0].shape[0]
        if per_image * self.n_images > self.budget:
            return
        self.targets = [first] + [self._original_pass(b) for b in range(1, len(self.batches))]
        self.held = self.targets_bytes = sum(_nbytes(t) for t in self.targets)
        self.peak_held = self.held

    def original(self, step: int, b: int, reader: int = 0) -> Original:
        """Unit ``step``'s targets for batch ``b``: stored, or computed from the input;
        those of its reader ``reader`` (0: its consumer, ``j``: ``unit.readers[j-1]``)."""
        if self.targets is not None:
            entry = self.targets[b]
        else:
            entry = {}
            watch = self._unit_watch(b, step, entry)
            with self.timer("forward"):
                self.ro.run(self.batches[b], 0, max(watch) + 1, watch=watch)
        at = _key(step, reader)
        return Original(
            entry.get(("pos", *at)),
            entry.get(("width", *at)),
            entry[("y", *at)],
            entry.get(("sc", *at)),
        )

    def drop_targets(self, step: int) -> None:
        """Free unit ``step``'s stored targets (done with them)."""
        if self.targets is None:
            return
        for entry in self.targets:
            for j in range(len(self._wants[step])):
                for kind in ("pos", "width", "y", "sc"):
                    value = entry.pop((kind, *_key(step, j)), None)
                    self.held -= _nbytes(value)

    # ------------------------------------------------------------------ pruned side

    def _final_values(self, lo: int, hi: int, ref: dict[Any, Any]) -> dict[int, list]:
        """Watchers accumulating the final errors of the nodes in ``lo .. hi-1``."""
        watch: dict[int, list] = {}
        for block in self.blocks:
            k = self.rp.index[block.add]
            if lo <= k < hi:

                def on_add(v: Tensor, name: str = block.add, blk: str = block.name) -> None:
                    with self.timer("stats"):
                        p, r = ref[("add", name)]
                        sums = self._sums[blk]
                        sums[0] += float(((gather_targets(v.detach(), p) - r) ** 2).sum())
                        sums[1] += float((r**2).sum())

                watch.setdefault(k, []).append(on_add)
        k = len(self.rp) - 1
        if lo <= k < hi:

            def on_output(v: Any) -> None:
                y_o = ref["output"]
                if isinstance(y_o, Tensor) and isinstance(v, Tensor) and self._out is not None:
                    self._out[0] += float(((v.double() - y_o.double()) ** 2).sum())
                    self._out[1] += float((y_o.double() ** 2).sum())
                else:
                    self._out = None

            watch.setdefault(k, []).append(on_output)
        return watch

    def _advance(self, b: int, watch: dict[int, list], need: int) -> None:
        """Run batch ``b`` of the pruned net through step ``self.step``'s range."""
        i = self.step
        lo, cut = (self.cuts[i - 1] if i > 0 else 0), self.cuts[i]
        if self.final and self.targets is not None and lo < cut:
            for k, fns in self._final_values(lo, cut, self.targets[b]).items():
                watch.setdefault(k, []).extend(fns)
        env, self.frontier[b] = self.frontier[b], None
        self.held -= self._frontier_bytes[b]
        self._frontier_bytes[b] = 0
        start = lo if env is not None else 0
        keep = self.budget > 0 and (i + 1 < len(self.units) or (self.final and cut < len(self.rp)))
        stop = max(need, cut if keep else 0, max(watch, default=-1) + 1)
        with self.timer("forward"):
            snap = self.rp.run(
                self.batches[b], start, stop, env, watch=watch, snapshot_at=cut if keep else None
            )
        del env
        if snap is not None:
            size = _nbytes(snap)
            if self.held + size <= self.budget:
                self.frontier[b], self._frontier_bytes[b] = snap, size
                self.held += size
                self.peak_held = max(self.peak_held, self.held)

    def pruned(self, step: int, b: int, watch: Watch) -> None:
        """Run batch ``b`` of the pruned network for unit ``step``.

        ``watch`` lists (node name, callback) pairs: each callback gets that node's
        value in the partly pruned network. Steps must come in order, every batch of a
        step before the next step.
        """
        if step != self.step:
            if step != self.step + 1 or b != 0:
                raise RuntimeError(f"recon.passes: step {step} out of order (at {self.step})")
            self._check_kept(step)
            self.step = step
        w: dict[int, list] = {}
        for name, fn in watch:
            w.setdefault(self.rp.index[name], []).append(fn)
        self._advance(b, w, max(w, default=-1) + 1)

    def finish(
        self, reduce: Callable[[list[float]], list[float]] | None = None
    ) -> tuple[float | None, dict[str, float]]:
        """Run the rest of the pruned network; the output and block errors.

        With the targets stored, the errors of each node were summed as soon as its
        value was final, and only the rest of the graph runs here; otherwise both
        networks run once more from the input. ``reduce``, if given, sums the error
        numerators and denominators over processes (a list of floats in, its sum out).

        Returns
        -------
        output_error : float or None
            ``Σ‖y' − y‖² / Σ‖y‖²`` of the network output (None if not a tensor).
        block_errors : dict of str to float
            The same, sampled, for each residual block's output.
        """
        if not self.final:
            raise RuntimeError("recon.passes: finish() on passes made with final=False")
        self._check_kept(len(self.units))
        self.step = len(self.units)
        n = len(self.rp)
        for b in range(len(self.batches)):
            if self.targets is not None:
                self._advance(b, {}, n)
                continue
            ref: dict[Any, Any] = {}
            with self.timer("forward"):
                self.ro.run(self.batches[b], 0, n, watch=self._final_watch(b, ref))
                self.rp.run(self.batches[b], 0, n, watch=self._final_values(0, n, ref))
        self.frontier = [None] * len(self.batches)
        self.targets = None
        self.held = 0
        if reduce is not None:
            names = list(self._sums)
            flat = [v for k in names for v in self._sums[k]]
            out = self._out or [0.0, 0.0]
            flat = reduce([*flat, out[0], out[1], float(self._out is None)])
            self._sums = {k: flat[2 * i : 2 * i + 2] for i, k in enumerate(names)}
            self._out = None if flat[-1] > 0 else flat[-3:-1]
        out = self._out
        self.output_error = None if out is None else (out[0] / out[1] if out[1] > 0 else 0.0)
        self.block_errors = {k: (e / r if r > 0 else 0.0) for k, (e, r) in self._sums.items()}
        return self.output_error, self.block_errors
