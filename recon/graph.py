"""Discovery of prunable units in a model's ``torch.fx`` graph.

A *unit* is a producer whose output channels can be removed together with the consumer
inputs that read them::

    producer conv -> [BN | ReLU | pooling | dropout | identity | depthwise conv]* -> consumer conv
    producer conv -> [...]* -> flatten -> [ReLU | dropout]* -> consumer linear
    producer conv -> [...]* -> cat([..., ·, ...], dim=1) -> [BN | ReLU | pooling]* -> consumer conv
    producer conv -> [...]* -> (several paths as above, each to its own reader conv)

A concatenation: the producer's channels are a slice of the consumer's input, after
those of the operands before it (:attr:`Unit.cat_lead`); only that slice is cut and
re-fitted, the consumer's weights on the other channels stay. A value read by several
convs (SqueezeNet's squeeze, a concatenation read by every branch of the next
inception module, DenseNet's features read by every later layer through their own
concatenations and BatchNorms) gives a unit with several readers
(:attr:`Unit.readers`), each cut and re-fitted on its slice (:func:`_readers`).

A grouped conv (``1 < groups``, not depthwise; ResNeXt, RegNet) may be either end: as a
consumer its ``G`` groups read disjoint slices of the channels, so the unit's problem
splits into ``G`` independent ones (:mod:`recon.groups`), each keeping the same share;
as a producer each group keeps the same number of its outputs. Either way the unit's
kept count is a multiple of ``G`` (:attr:`Unit.step`). A grouped producer feeding a
grouped consumer is not a unit.

A squeeze-and-excitation gate between them, ``x * σ(fc2(act(fc1(pool(x)))))`` with 1×1
convs ``fc1`` (from the unit's channels) and ``fc2`` (back to them), is cut too
(:attr:`Unit.gate`): fc2's outputs and fc1's inputs, fc1 re-fitted on what is kept.

A depthwise conv (``groups == in_channels == out_channels``) maps channel ``i`` to
channel ``i``, like a BatchNorm: in an inverted residual (1×1 expand -> BN -> ReLU6 ->
depthwise -> BN -> ReLU6 -> 1×1 project) the expand conv is the producer, the project
conv the consumer, and the depthwise conv and both BatchNorms are cut along with the
producer. A depthwise conv is never a producer or a consumer itself.

Transformer-era layers add two kinds over the last dimension. An MLP, ``fc1 -> GELU
-> fc2`` applied at every token (ConvNeXt's inverted bottleneck after its permute and
LayerNorm, the MLP blocks of ViT, Swin and MaxViT): fc1's output features are the
channels, fc2 reads them at every token (``consumer_kind="tokens"``). And the heads of
a batch-first self-attention ``nn.MultiheadAttention`` (torchvision's ViT) or of a
Swin window attention: each head is a channel of ``head_dim`` features, read by the
output projection (``consumer_kind="heads"``); removing one removes its query, key
and value rows (and its column of Swin's relative position bias).

Each channel-wise op in between must have the producer's output as its only input;
a value whose users do not all lead to convs this way (a residual ``add``, a second
head, arithmetic with another tensor) couples channels and ends the search with a
recorded reason. Units are
found from the graph, not from class names, so any model built from standard layers
works.

Residual networks add a second kind of unit. Channels that meet in an ``add`` are
coupled across a stage and never removed; instead a *sampler unit* lets a residual
branch's first conv read only some of its input channels (see :mod:`recon.layers`)::

    fork -> [channel-wise]* -> first conv -> ... -> last conv -> [BN] -> add
      '----------------------- shortcut (identity or 1x1 conv + BN) ----'

Each such ``add`` is described by a :class:`Block`. This module sees modules only.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import HeadAttention, SampledConv2d, attention_heads, is_window_attention

__all__ = ["Block", "Graph", "Unit", "called", "find_units", "trace"]

# Element-wise modules: allowed between producer and consumer, also after a flatten.
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Dropout,
    nn.Identity,
)
# Modules that act on each channel separately (and keep the channel dimension).
_CHANNELWISE_MODULES = (
    *_ELEMENTWISE_MODULES,
    nn.BatchNorm2d,
    nn.PReLU,  # only the single-parameter form: checked in _follow
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout2d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.hardswish,
    F.hardtanh,
    F.mish,
    F.dropout,
}
_CHANNELWISE_FUNCTIONS = _ELEMENTWISE_FUNCTIONS | {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.dropout2d,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
# Element-wise arithmetic: channel-wise when every operand but the tensor is a number
# (``x * 0.5 + 1``, ``x.clamp(0, 6)``, a hand-written hard-swish ``x * F.relu6(x + 3) / 6``
# is not: it reads x twice).
_SCALAR_FUNCTIONS = {
    operator.mul, operator.imul, operator.add, operator.iadd, operator.sub, operator.isub,
    operator.truediv, operator.itruediv, operator.neg, operator.pow, torch.mul, torch.add,
    torch.sub, torch.div, torch.neg, torch.clamp, torch.clip, torch.pow, torch.abs,
}  # fmt: skip
_SCALAR_METHODS = {
    "mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "neg", "neg_", "clamp",
    "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_", "pow",
    "abs", "abs_",
}  # fmt: skip
# Reductions over the spatial dimensions (a hand-written global pooling).
_SPATIAL_REDUCE_METHODS = {"mean", "sum", "amax"}
_SPATIAL_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}


@dataclass(frozen=True)
class Unit:
    """A producer layer whose output channels can be removed, and what reads them.

    Attributes
    ----------
    name : str
        The producer's qualified module name (the name used in budgets and reports);
        for a sampler unit, the consumer's name + ``".sampler"``.
    producer : str or None
        Same as ``name`` for plain units; None for a sampler unit, whose channels are
        not removed at their producer but skipped by a sampler in front of the consumer.
    consumer : str
        Module that reads the producer's channels (a conv, or a linear after flatten).
    consumer_kind : {"conv", "linear", "tokens", "heads"}
        ``"linear"``: a linear layer after a flatten; ``"tokens"``: a linear layer over
        the last dimension of (B, ..., width) read at every token (an MLP's second
        layer; the producer is its first); ``"heads"``: the output projection of a
        self-attention layer (the producer), whose ``width`` heads of ``taps`` features
        each are the channels.
    channelwise : tuple of str
        Modules between producer and consumer that are sliced with the producer, in
        forward order: BatchNorms and depthwise convs.
    consumer_bn : str or None
        A BatchNorm directly after the consumer (a bias change can be folded into it).
    width : int
        Producer output channels.
    taps : int
        Consumer input features per channel: ``kh*kw`` for a conv, ``H*W`` for a linear
        after flatten.
    kind : {"plain", "sampler"}
    groups : int
        The consumer's groups (1 unless it is a grouped conv): group ``g`` reads channels
        ``g*width/groups ..`` and writes outputs ``g*n/groups ..``.
    producer_groups : int
        The producer's groups: each group's outputs are kept in equal numbers.
    gate : (str, str) or None
        A squeeze-and-excitation gate between producer and consumer, ``x * σ(fc2(act(
        fc1(pool(x)))))``: its 1×1 convs ``(fc1, fc2)``. fc2's outputs are cut with the
        producer, fc1's inputs too, and fc1 is re-fitted on the kept channels.
    cat_lead : tuple of str or None
        None unless the producer's output reaches the consumer through a concatenation
        along channels; then the convs whose outputs come before it there (empty for
        the first operand): the slice of the consumer's input the unit owns starts at
        the sum of their output channels at the time (:func:`recon.surgery.
        channel_offset`), and the consumer reads more channels than ``width``.
    cat_after : tuple of str
        BatchNorms between the concatenation and the consumer (DenseNet's ``norm1``):
        their slice of channels is cut with the unit.
    readers : tuple of Unit
        Other convs that read the producer's channels (a value read by several layers:
        SqueezeNet's squeeze, GoogLeNet's inception outputs, DenseNet's features), each
        as a unit of one reader named ``"<name>><reader>"``, with its own slice and
        re-fit; the channels kept are chosen for all readers together.
    """

    name: str
    producer: str | None
    consumer: str
    consumer_kind: str
    width: int
    taps: int
    channelwise: tuple[str, ...] = ()
    consumer_bn: str | None = None
    kind: str = "plain"
    groups: int = 1
    producer_groups: int = 1
    gate: tuple[str, str] | None = None
    cat_lead: tuple[str, ...] | None = None
    cat_after: tuple[str, ...] = ()
    readers: tuple[Unit, ...] = ()

    @property
    def step(self) -> int:
        """Kept counts are multiples of this: the groups of the producer or consumer."""
        return math.lcm(self.groups, self.producer_groups)


@dataclass(frozen=True)
class Block:
    """A residual ``add`` whose one operand is a conv branch and the other a shortcut.

    Attributes
    ----------
    name : str
        The branch convs' common module prefix (``"layer1.0"``), else the add's node name.
    add : str
        Name of the fx node of the ``add``.
    branch : str
        fx node name of the branch operand of the add (its value is the branch output).
    shortcut : str
        fx node name of the shortcut operand.
    convs : tuple of str
        The branch's convolutions in forward order (a chain of plain units).
    bn : str or None
        A BatchNorm between the last branch conv and the add.
    linear_tail : bool
        Whether only that BatchNorm (or nothing, identity, dropout) lies between the
        last conv and the add, so that the block's sum is affine in the conv's output:
        the condition for re-fitting the last conv against the block's sum.
    sampler : bool
        Whether a sampler layer may be put in front of the first branch conv (its
        input is coupled, and it is not the network's input).
    """

    name: str
    add: str
    branch: str
    shortcut: str
    convs: tuple[str, ...]
    bn: str | None
    linear_tail: bool
    sampler: bool

    @property
    def first(self) -> str:
        return self.convs[0]

    @property
    def last(self) -> str:
        return self.convs[-1]


@dataclass
class Graph:
    """Units of a model in forward order, and why other convolutions are not units.

    ``unsupported`` names the modules (or nodes) in a pattern recon refuses to prune
    around, with the reason; :func:`recon.prune` raises on any of them.
    """

    units: list[Unit]
    skipped: dict[str, str] = field(default_factory=dict)
    graph_module: fx.GraphModule | None = None
    blocks: list[Block] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)

    def block_of(self, conv: str) -> Block | None:
        """The residual block whose last branch conv is ``conv``, if any."""
        for b in self.blocks:
            if b.last == conv:
                return b
        return None

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]


class _Tracer(fx.Tracer):
    """fx's tracer, with recon's sampled convolutions kept as leaf modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, SampledConv2d | HeadAttention) or is_window_attention(m):
            return True  # (a window attention's projections are not called as modules)
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear ``ValueError`` when it cannot be traced."""
    try:
        graph = _Tracer().trace(model)
        name = type(model).__name__
        return fx.GraphModule(model, graph, name)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        raise ValueError(
            f"recon could not trace the model of type {type(model).__name__} with "
            f"torch.fx ({type(exc).__name__}: {exc}). recon discovers prunable layers "
            "from the fx graph; models with data-dependent control flow in forward() "
            "are not supported."
        ) from exc


def _is_size_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def _flatten_kind(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` flattens (B, c, H, W) to (B, c*H*W)."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return len(shape) == 2 and (shape[1] == -1 or shape[0] == -1)
    return False


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"function {name}() at node '{node.name}'"
    if node.op == "call_method":
        return f"method .{node.target}() at node '{node.name}'"
    if node.op == "output":
        return "the model's output"
    return f"node '{node.name}'"


def _supported_conv(m: nn.Module) -> str | None:
    """None when ``m`` is a conv recon can slice, else the reason it cannot."""
    if not isinstance(m, nn.Conv2d) or type(m) not in (nn.Conv2d, SampledConv2d):
        if isinstance(m, nn.Conv2d):
            return f"it is a {type(m).__name__}, a Conv2d subclass recon does not know"
        return "it is not a Conv2d"
    if _depthwise(m):
        return (
            f"it is a depthwise convolution (groups={m.groups}), not a producer or consumer "
            "itself: recon cuts it only as a channel-wise op between a producer and its "
            "consumer"
        )
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} is not supported (only 'zeros')"
    return None


def _depthwise(m: nn.Module) -> bool:
    """Whether ``m`` is a depthwise conv: ``groups == in_channels == out_channels > 1``."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels


def _grouped(m: nn.Conv2d) -> str:
    """What kind of grouped (not depthwise) conv ``m`` is, for a message."""
    if m.groups == m.in_channels:
        return (
            f"a depthwise convolution with depth multiplier {m.out_channels // m.in_channels} "
            f"(groups={m.groups}, {m.in_channels} -> {m.out_channels} channels)"
        )
    return f"a grouped convolution (groups={m.groups})"


def _grouped_consumer(m: nn.Conv2d, producer_groups: int) -> str | None:
    """None when grouped conv ``m`` can be a unit's consumer, else the reason."""
    if m.in_channels // m.groups == 1:
        return (
            f"it is {_grouped(m)} that reads one channel per group: none can be removed "
            "without removing its group"
        )
    if producer_groups > 1:
        return (
            f"it is a grouped convolution (groups={m.groups}) reading the outputs of a "
            f"grouped one (groups={producer_groups}): not supported"
        )
    return None


def _cuttable_depthwise(m: nn.Conv2d, width: int) -> str | None:
    """None when depthwise ``m`` can be cut along with a unit of ``width`` channels."""
    if type(m) is not nn.Conv2d:
        return f"it is a {type(m).__name__}, a Conv2d subclass recon does not know"
    if m.in_channels != width:
        return f"it reads {m.in_channels} channels, not {width}"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} is not supported (only 'zeros')"
    return None


def find_units(model: nn.Module, gm: fx.GraphModule | None = None) -> Graph:
    """Find the prunable units of ``model`` from its fx graph, in forward order."""
    gm = trace(model) if gm is None else gm
    modules = dict(gm.named_modules())
    units: list[Unit] = []
    skipped: dict[str, str] = {}
    # A module called more than once (shared weights) cannot be sliced for one call only.
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, nn.MultiheadAttention | HeadAttention) or is_window_attention(m):
            found = _attention(node, m) if calls[node.target] == 1 else "it is called twice"
            if isinstance(found, Unit):
                units.append(found)
            else:
                skipped[node.target] = found
            continue
        if (
            type(m) is nn.Linear
            and node.target not in skipped
            and not _after_flatten(node, modules)
        ):
            found = _follow_linear(node, m, modules) if calls[node.target] == 1 else None
            if isinstance(found, Unit) and calls[found.consumer] > 1:
                found = f"its consumer '{found.consumer}' is called {calls[found.consumer]} times"
            if isinstance(found, Unit):
                units.append(found)
            elif found is not None and _hidden_linear(node, modules):
                skipped[node.target] = found
            continue
        if not isinstance(m, nn.Conv2d) or node.target in skipped:
            continue
        reason = _supported_conv(m)
        if reason is None and calls[node.target] > 1:
            reason = f"forward() calls it {calls[node.target]} times (shared weights)"
        if reason is not None:
            skipped[node.target] = reason
            continue
        unit_or_reason = _follow(node, m, modules)
        if isinstance(unit_or_reason, Unit):
            u = unit_or_reason
            touched = [
                n for r in (u, *u.readers) for n in (r.consumer, *r.cat_after, *r.channelwise)
            ]
            shared = [n for n in (*touched, *(u.gate or ())) if calls[n] > 1]
            if shared:
                unit_or_reason = (
                    f"its output flows into '{shared[0]}', which forward() calls "
                    f"{calls[shared[0]]} times (shared weights)"
                )
        if isinstance(unit_or_reason, Unit):
            units.append(unit_or_reason)
        else:
            skipped[node.target] = unit_or_reason
    # Convolutions that fx traced through (a Conv2d subclass is not a leaf module) or that
    # forward() never calls are no call_module node: record why they cannot be pruned.
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name not in calls and name not in skipped:
            skipped[name] = _supported_conv(m) or "forward() does not call it as a module"
    _note_depthwise(units, skipped, modules)
    unsupported: dict[str, str] = {}
    blocks = _find_blocks(gm, modules, calls, unsupported)
    sampled = {b.first for b in blocks if b.sampler and modules[b.first].groups == 1}
    for u in [u for u in units if u.readers]:
        clash = [r.consumer for r in (u, *u.readers) if r.consumer in sampled]
        if clash:  # its input is a residual fork: a sampler unit cuts it
            units.remove(u)
            skipped[u.name] = (
                f"its output is read by {len(u.readers) + 1} convs, among them '{clash[0]}', "
                "the first conv of a residual branch, whose input a sampler cuts: its "
                "channels are coupled with the residual stage"
            )
    for block in blocks:
        conv = modules[block.first]  # a SampledConv2d reads conv.in_channels of its input
        if not block.sampler or conv.groups != 1:  # a sampler is a groups=1 conv
            continue
        units.append(
            Unit(
                name=f"{block.first}.sampler",
                producer=None,
                consumer=block.first,
                consumer_kind="conv",
                width=conv.in_channels,
                taps=conv.kernel_size[0] * conv.kernel_size[1],
                consumer_bn=_bn_after(_node_of(gm, block.first), modules),
                kind="sampler",
            )
        )
    order = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    units.sort(key=lambda u: order[called(u)])
    return Graph(units, skipped, gm, blocks, unsupported)


def called(unit: Unit) -> str:
    """The module whose call reads the unit's channels: its consumer, or for attention
    heads the attention layer (its output projection is not called as a module)."""
    return unit.producer if unit.consumer_kind == "heads" else unit.consumer


def _note_depthwise(
    units: list[Unit], skipped: dict[str, str], modules: dict[str, nn.Module]
) -> None:
    """Say in ``skipped`` which unit cuts each depthwise conv, or that none does."""
    cut = {n: u.name for u in units for n in u.channelwise if isinstance(modules[n], nn.Conv2d)}
    for name, reason in skipped.items():
        if name in cut:
            skipped[name] = (
                f"it is a depthwise convolution (groups={modules[name].groups}), not a "
                f"producer or consumer itself: it is cut as a channel-wise op with the "
                f"unit '{cut[name]}'"
            )
        elif _depthwise(modules.get(name)) and reason == _supported_conv(modules[name]):
            skipped[name] = f"{reason}; no unit reaches it here"


# --------------------------------------------------------------------------- residuals

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
# Between the last branch conv and the add: ops under which the sum stays affine.
_LINEAR_TAIL = (nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d)


def _node_of(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return "alpha" not in node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs


def _channelwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a one-input op that acts on each channel separately."""
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) in _CHANNELWISE_MODULES and not (
            isinstance(m, nn.PReLU) and m.num_parameters != 1
        )
    if _scalar_op(node):
        return True
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _scalar_op(node: fx.Node) -> bool:
    """Whether ``node`` is element-wise arithmetic of one tensor with Python numbers."""
    if node.op == "call_function":
        known = node.target in _SCALAR_FUNCTIONS
    else:
        known = node.op == "call_method" and node.target in _SCALAR_METHODS
    if not known or len(node.all_input_nodes) != 1:
        return False
    return _numbers_only(node)


def _numbers_only(node: fx.Node) -> bool:
    """Whether every argument of ``node`` that is not a graph value is a number (or None)."""
    others = [a for a in (*node.args, *node.kwargs.values()) if not isinstance(a, fx.Node)]
    return all(a is None or isinstance(a, int | float) for a in others)


def _spatial_reduce(node: fx.Node) -> str | None:
    """``"keep"`` for a mean/sum/amax over dims (2, 3) of a (B, c, H, W) value that keeps
    them (still channel-wise), ``"flat"`` for one that drops them ((B, c), as a flatten
    of 1×1 maps), None for anything else."""
    if node.op == "call_method" and node.target in _SPATIAL_REDUCE_METHODS:
        pass
    elif not (node.op == "call_function" and node.target in _SPATIAL_REDUCE_FUNCTIONS):
        return None
    if len(node.all_input_nodes) != 1 or node.args[0] is not node.all_input_nodes[0]:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if set(node.kwargs) - {"dim", "keepdim"} or not isinstance(keep, bool):
        return None
    ints = isinstance(dims, tuple | list) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in dims
    )
    if not ints or len(dims) != 2 or {d % 4 for d in dims} != {2, 3}:
        return None
    return "keep" if keep else "flat"


_BINARY_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add,
    torch.sub, torch.div,
}  # fmt: skip
_BINARY_METHODS = {"mul", "add", "sub", "div"}
_MAX_REGION = 16  # nodes in a hand-written activation (hard-swish is 4)


def _elementwise_region(
    start: fx.Node, modules: dict[str, nn.Module]
) -> tuple[fx.Node, list[fx.Node]] | None:
    """Where a hand-written element-wise function of ``start`` ends, and its nodes; or None.

    ``start``'s value read by several element-wise nodes that merge again, such as
    hard-swish ``x * F.relu6(x + 3) / 6`` or swish ``x * torch.sigmoid(x)``: walking the
    graph in order from ``start``, every node that reads the region is channel-wise or
    element-wise arithmetic of region values (and numbers), until one node is the only
    region value still to be read. The region as a whole maps channel ``i`` to channel
    ``i``.
    """
    live = {start}  # region values with users not yet reached
    region: list[fx.Node] = []
    node = start.next
    while node.op != "output" and len(region) < _MAX_REGION:
        if any(a in live for a in node.all_input_nodes) and not _is_size_query(node):
            binary = (node.op == "call_function" and node.target in _BINARY_FUNCTIONS) or (
                node.op == "call_method" and node.target in _BINARY_METHODS
            )
            if not (_channelwise(node, modules) or binary):
                return None
            if any(a not in live for a in node.all_input_nodes):
                return None  # a value from outside the region couples the channels
            if not _numbers_only(node):
                return None
            region.append(node)
            live.add(node)
            seen = set(region)
            live = {v for v in live if any(u not in seen for u in _users(v))}
            if live == {node}:
                return node, region
        node = node.next
    return None


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _is_size_query(u)]


def _single_user(node: fx.Node) -> bool:
    return len(_users(node)) == 1


def _upstream(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The value above ``node``'s input, skipping channel-wise ops that have one user."""
    cur = node.args[0] if node.args else None
    while (
        isinstance(cur, fx.Node)
        and _channelwise(cur, modules)
        and _single_user(cur)
        and len(cur.all_input_nodes) == 1
    ):
        cur = cur.args[0]
    return cur if isinstance(cur, fx.Node) else None


def _is_conv(node: fx.Node | None, modules: dict[str, nn.Module]) -> bool:
    return (
        node is not None
        and node.op == "call_module"
        and isinstance(modules[node.target], nn.Conv2d)
    )


def _tail(
    operand: fx.Node, modules: dict[str, nn.Module]
) -> tuple[fx.Node | None, str | None, bool]:
    """Walk up from an add operand to the conv that produces it: (conv, bn, linear tail).

    An operand that other nodes also read is the fork itself (an identity shortcut).
    """
    if not _single_user(operand):
        return None, None, False
    cur, bn, linear = operand, None, True
    while not _is_conv(cur, modules):
        if not (_channelwise(cur, modules) and len(cur.all_input_nodes) == 1):
            return None, None, False
        if cur is not operand and not _single_user(cur):
            return None, None, False
        if cur.op == "call_module" and isinstance(modules[cur.target], nn.BatchNorm2d):
            if bn is not None:
                linear = False
            bn = cur.target
        elif not (cur.op == "call_module" and type(modules[cur.target]) in _LINEAR_TAIL):
            linear = False
        cur = cur.args[0]
    if cur is not operand and not _single_user(cur):
        return None, None, False
    return cur, bn, linear


def _chain(last: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], fx.Node | None]:
    """The convs of a branch ending at ``last`` (forward order) and the value it forks from."""
    convs = [last]
    while True:
        up = _upstream(convs[0], modules)
        if _is_conv(up, modules) and _single_user(up):
            convs.insert(0, up)
        else:
            return convs, up


def _block_name(convs: list[str], fallback: str) -> str:
    parts = [c.split(".")[:-1] for c in convs]
    prefix = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix) if prefix and len(convs) > 1 else fallback


def _branch_side(chains: list[tuple[list[fx.Node], fx.Node | None]]) -> int | None:
    """Which of two operands' conv chains of equal length is the branch, or None.

    The shortcut is the side that forks from the block's input; the branch forks later,
    from a value computed from that input (RegNet-Y: its last conv reads a squeeze-and-
    excitation product, so its chain is one conv long, like the 1×1 shortcut's).
    """
    forks = [fork for _, fork in chains]
    if forks[0] is None or forks[1] is None or forks[0] is forks[1]:
        return None
    if _reads(forks[1], forks[0]):
        return 1
    if _reads(forks[0], forks[1]):
        return 0
    return None


def _find_blocks(
    gm: fx.GraphModule,
    modules: dict[str, nn.Module],
    calls: Counter,
    unsupported: dict[str, str],
) -> list[Block]:
    """Residual blocks: adds of a conv branch and a shortcut, in forward order."""
    blocks = []
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        if len(operands) != 2:
            continue
        tails = [_tail(o, modules) for o in operands]
        chains = [_chain(t[0], modules) if t[0] is not None else ([], None) for t in tails]
        lengths = [len(c[0]) for c in chains]
        if max(lengths) == 0:
            continue  # no conv on either side: not a residual block recon can act on
        i = 0 if lengths[0] > lengths[1] else 1
        if lengths[0] == lengths[1]:
            i = _branch_side(chains)
        if i is None:
            convs = ", ".join(f"'{c[0][-1].target}'" for c in chains)
            unsupported[str(node.name)] = (
                f"the residual add at node '{node.name}' sums two branches of "
                f"{lengths[0]} convolution(s) each (ending at {convs}); recon needs one "
                "conv branch and one shortcut (identity, or a single conv + BN)"
            )
            continue
        (_, bn, linear), (convs, fork) = tails[i], chains[i]
        names = [str(c.target) for c in convs]
        if any(calls[n] > 1 for n in names) or not all(
            _supported_conv(modules[n]) is None
            or (0 < j < len(names) - 1 and _depthwise(modules[n]))  # cut by the first's unit
            for j, n in enumerate(names)
        ):
            continue  # shared or unsupported convs: pruned as nothing, reported as skipped
        sampler = fork is not None and fork.op != "placeholder" and not _single_user(fork)
        blocks.append(
            Block(
                name=_block_name(names, str(node.name)),
                add=str(node.name),
                branch=str(operands[i].name),
                shortcut=str(operands[1 - i].name),
                convs=tuple(names),
                bn=bn,
                linear_tail=linear,
                sampler=sampler,
            )
        )
    return blocks


def _follow(node: fx.Node, producer: nn.Conv2d, modules: dict[str, nn.Module]) -> Unit | str:
    """Walk from a producer conv to its consumer; a Unit, or the reason there is none."""
    width = producer.out_channels
    name = node.target
    channelwise: list[str] = []  # BatchNorms and depthwise convs, sliced with the producer
    se_gate: tuple[str, str] | None = None  # a squeeze-and-excitation gate's (fc1, fc2)
    flattened = False
    cur = node
    while True:
        users = _users(cur)
        merged = _elementwise_region(cur, modules) if len(users) > 1 else None
        if merged is not None:  # a hand-written activation: go on from where it ends
            end, region = merged
            for n in region:
                if n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d):
                    return f"'{n.target}' (BatchNorm2d) inside an element-wise expression"
            cur = end
            continue
        gate = _gate(cur, users)
        if gate is not None:
            se = _se_gate(cur, gate, modules, width) if se_gate is None else "a second gate"
            if isinstance(se, str):
                return (
                    f"its output (through {_describe(cur, modules)}) is multiplied at node "
                    f"'{gate.name}' by a gate computed from all its channels (squeeze-and-"
                    f"excitation) that recon cannot cut along ({se}): its channels are "
                    "coupled with the gate's layers, the unit is left whole"
                )
            se_gate, cur = se, gate
            continue
        if not flattened and se_gate is None and (len(users) > 1 or _is_cat(users[0])):
            found = _readers(cur, users, width, modules)  # several readers, or a slice
            if isinstance(found, list):
                return _unit(name, producer, found, tuple(channelwise))
        else:
            found = None
        if len(users) != 1:
            what = ", ".join(_describe(u, modules) for u in users) or "nothing"
            return (
                f"its output (through {_describe(cur, modules)}) is used by {len(users)} "
                f"nodes ({what}): its channels are coupled with other layers"
                + (f" ({found})" if found else "")
            )
        nxt = users[0]
        if _is_cat(nxt):
            return (
                f"its output flows into the concatenation at node '{nxt.name}', which "
                f"recon cannot cut along ({found or 'it is flattened or gated first'}): its "
                "channels are coupled"
            )
        if any(isinstance(a, fx.Node) and a is not cur for a in nxt.all_input_nodes):
            if not (nxt.op == "call_method" and nxt.target in ("view", "reshape")):
                return (
                    f"its output flows into {_describe(nxt, modules)}, which combines it "
                    "with other values: its channels are coupled"
                )
        if nxt.op == "call_module":
            mod = modules[nxt.target]
            if _depthwise(mod) and not flattened:
                why = _cuttable_depthwise(mod, width)
                if why is not None:
                    return f"the depthwise convolution '{nxt.target}' cannot be cut along: {why}"
                channelwise.append(nxt.target)
                cur = nxt
                continue
            if isinstance(mod, nn.Conv2d) and not flattened:
                why = _supported_conv(mod)
                if why is None and mod.groups > 1:
                    why = _grouped_consumer(mod, producer.groups)
                if why is not None:
                    return f"its consumer '{nxt.target}' cannot be pruned: {why}"
                if mod.in_channels != width:
                    return (
                        f"its consumer '{nxt.target}' reads {mod.in_channels} channels, not {width}"
                    )
                return Unit(
                    name=name,
                    producer=name,
                    consumer=nxt.target,
                    consumer_kind="conv",
                    width=width,
                    taps=mod.kernel_size[0] * mod.kernel_size[1],
                    channelwise=tuple(channelwise),
                    consumer_bn=_bn_after(nxt, modules),
                    groups=mod.groups,
                    producer_groups=producer.groups,
                    gate=se_gate,
                )
            if isinstance(mod, nn.Linear) and flattened:
                if mod.in_features % width:
                    return (
                        f"its consumer '{nxt.target}' has {mod.in_features} input features, "
                        f"not a multiple of {width} channels"
                    )
                return Unit(
                    name=name,
                    producer=name,
                    consumer=nxt.target,
                    consumer_kind="linear",
                    width=width,
                    taps=mod.in_features // width,
                    channelwise=tuple(channelwise),
                    consumer_bn=_bn_after(nxt, modules),
                    producer_groups=producer.groups,
                    gate=se_gate,
                )
            allowed = _ELEMENTWISE_MODULES if flattened else _CHANNELWISE_MODULES
            if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
                return f"it flows into '{nxt.target}' (PReLU, per-channel slopes): not supported"
            if type(mod) in allowed:
                if isinstance(mod, nn.BatchNorm2d):
                    if mod.num_features != width:
                        return f"'{nxt.target}' normalises {mod.num_features} channels, not {width}"
                    channelwise.append(nxt.target)
            elif not flattened and _flatten_kind(nxt, modules):
                flattened = True
            else:
                return _opaque(nxt, modules)
        elif nxt.op == "call_function" and nxt.target in (
            _ELEMENTWISE_FUNCTIONS if flattened else _CHANNELWISE_FUNCTIONS
        ):
            pass
        elif nxt.op == "call_method" and nxt.target in _ELEMENTWISE_METHODS:
            pass
        elif _scalar_op(nxt):
            pass
        elif not flattened and _spatial_reduce(nxt) == "keep":
            pass
        elif not flattened and (_flatten_kind(nxt, modules) or _spatial_reduce(nxt) == "flat"):
            flattened = True
        elif flattened and _flatten_kind(nxt, modules):
            pass  # flattening (B, features) again changes nothing
        elif nxt.op == "call_function" and nxt.target is operator.getitem:
            return f"its output is indexed at node '{nxt.name}', which recon cannot see through"
        else:
            return _opaque(nxt, modules)
        cur = nxt


def _follow_linear(node: fx.Node, producer: nn.Linear, modules: dict[str, nn.Module]) -> Unit | str:
    """Walk from a producer linear layer through element-wise ops to a consumer linear
    layer over the same last dimension (an MLP: ``fc1 -> GELU -> fc2``): a Unit whose
    channels are ``fc1``'s output features, read by ``fc2`` at every token position,
    or the reason there is none."""
    width = producer.out_features
    cur = node
    while True:
        users = _users(cur)
        if len(users) != 1:
            what = ", ".join(_describe(u, modules) for u in users) or "nothing"
            return (
                f"its output (through {_describe(cur, modules)}) is used by {len(users)} "
                f"nodes ({what}): its features are coupled with other layers"
            )
        nxt = users[0]
        if any(isinstance(a, fx.Node) and a is not cur for a in nxt.all_input_nodes):
            return (
                f"its output flows into {_describe(nxt, modules)}, which combines it "
                "with other values: its features are coupled"
            )
        if nxt.op == "call_module":
            mod = modules[nxt.target]
            if type(mod) is nn.Linear:
                if mod.in_features != width:
                    return (
                        f"its consumer '{nxt.target}' reads {mod.in_features} features, not {width}"
                    )
                return Unit(
                    name=str(node.target),
                    producer=str(node.target),
                    consumer=str(nxt.target),
                    consumer_kind="tokens",
                    width=width,
                    taps=1,
                )
            if type(mod) not in _ELEMENTWISE_MODULES:
                return _opaque(nxt, modules)
        elif not (
            (nxt.op == "call_function" and nxt.target in _ELEMENTWISE_FUNCTIONS)
            or (nxt.op == "call_method" and nxt.target in _ELEMENTWISE_METHODS)
            or _scalar_op(nxt)
        ):
            return _opaque(nxt, modules)
        cur = nxt


def _attention(node: fx.Node, m: nn.Module) -> Unit | str:
    """The heads of a self-attention layer as a unit (each head a channel of
    ``head_dim`` taps, read by the output projection), or why they are not one."""
    if is_window_attention(m):  # Swin: attn(x), x (B, H, W, C)
        h, d = attention_heads(m)
        if h < 2:
            return "it has one head"
        return Unit(str(node.target), str(node.target), f"{node.target}.proj", "heads", h, d)
    args = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")]
    sources = {a for a in args if isinstance(a, fx.Node)}
    if len(sources) != 1:
        return "it is not self-attention (query, key and value differ)"
    if any(node.kwargs.get(k) is not None for k in ("attn_mask", "key_padding_mask")):
        return "it is given an attention mask"
    if node.kwargs.get("is_causal"):
        return "it is causal"
    if isinstance(m, nn.MultiheadAttention):
        if not m.batch_first:
            return "it is not batch-first"
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            return (
                "its key or value projections differ from the packed in_proj (kdim, vdim, "
                "bias_k, add_zero_attn)"
            )
    for u in _users(node):  # the weights: getitem 1, read by nothing
        item = u.op == "call_function" and u.target is operator.getitem
        if not item or (u.args[1] != 0 and _users(u)):
            return f"its output is used at node '{u.name}', not only its first element"
    if m.num_heads < 2:
        return "it has one head"
    return Unit(
        name=str(node.target),
        producer=str(node.target),
        consumer=f"{node.target}.out_proj",
        consumer_kind="heads",
        width=m.num_heads,
        taps=m.head_dim,
    )


def _after_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a linear layer reads a flattened map, through element-wise ops and other
    linear layers: a CNN's classifier (VGG's, AlexNet's), one sample per image, whose
    hidden features recon leaves whole (they cost little of a CNN's FLOPs, and their
    4,096-wide re-fits from a few hundred samples much of its time)."""
    cur = node.args[0] if node.args else None
    for _ in range(64):
        if not isinstance(cur, fx.Node):
            return False
        if _flatten_kind(cur, modules) or _spatial_reduce(cur) == "flat":
            return True
        lin = cur.op == "call_module" and type(modules[cur.target]) is nn.Linear
        if not (lin or _elementwise(cur, modules)) or not cur.args:
            return False
        cur = cur.args[0]
    return False


def _hidden_linear(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a linear layer's output is read by another linear layer downstream (an
    MLP's hidden features), so a reason for leaving it whole is worth reporting; a
    classifier head feeding the output is not."""
    seen, todo = set(), list(_users(node))
    while todo:
        n = todo.pop()
        if n in seen or len(seen) > 64:
            continue
        seen.add(n)
        if n.op == "call_module" and type(modules[n.target]) is nn.Linear:
            return True
        todo.extend(_users(n))
    return False


_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_MAX_READERS = 64  # readers of one unit (DenseNet-121's widest block: 24)


@dataclass(frozen=True)
class _Reader:
    """Where one branch from a producer's value ends: a conv reading its channels."""

    consumer: str
    kind: str  # "conv" or "linear"
    taps: int
    consumer_bn: str | None
    cat_lead: tuple[str, ...] | None
    cat_after: tuple[str, ...]


def _unit(
    name: str, producer: nn.Conv2d, readers: list[_Reader], channelwise: tuple[str, ...]
) -> Unit:
    """The unit of ``producer`` read by ``readers`` (the first is its consumer)."""

    def one(r: _Reader, unit_name: str, cw: tuple[str, ...]) -> Unit:
        return Unit(
            name=unit_name,
            producer=name,
            consumer=r.consumer,
            consumer_kind=r.kind,
            width=producer.out_channels,
            taps=r.taps,
            channelwise=cw,
            consumer_bn=r.consumer_bn,
            producer_groups=producer.groups,
            cat_lead=r.cat_lead,
            cat_after=r.cat_after,
        )

    first = one(readers[0], name, channelwise)
    rest = tuple(one(r, f"{name}>{r.consumer}", ()) for r in readers[1:])
    return replace(first, readers=rest)


def _readers(
    value: fx.Node, users: list[fx.Node], width: int, modules: dict[str, nn.Module]
) -> list[_Reader] | str:
    """The layers that read ``value``'s channels along every path from it, or why recon
    cannot cut them all: each path runs through parameter-free channel-wise ops, at most
    one concatenation along channels (then also BatchNorms, sliced at the unit's
    offset), and may split again, to a plain conv (``groups=1``) — or, after a global
    pooling and a flatten, to a linear layer."""
    found: list[_Reader] = []
    todo = [(value, u, None, (), False, False) for u in users]  # ..., pooled, flat
    while todo:
        prev, node, lead, after, pooled, flat = todo.pop(0)
        if len(found) + len(todo) >= _MAX_READERS:
            return f"more than {_MAX_READERS} readers"
        mod = modules[node.target] if node.op == "call_module" else None
        if _is_cat(node):  # nested ones add up: the slice starts after both leads
            if flat:
                return f"a concatenation after a flatten at node '{node.name}'"
            more = _cat_lead(node, prev, modules)
            if isinstance(more, str):
                return f"the concatenation at node '{node.name}': {more}"
            if lead is not None and after:
                return f"a concatenation after a BatchNorm of another at node '{node.name}'"
            lead = (*more, *(lead or ()))  # in channel order: the outer operands first
        elif _flatten_kind(node, modules) or (not flat and _spatial_reduce(node) == "flat"):
            pooled, flat = pooled or _spatial_reduce(node) == "flat", True
        elif any(a is not prev for a in node.all_input_nodes):
            return f"{_describe(node, modules)} combines it with other values"
        elif isinstance(mod, nn.Conv2d) and not flat:
            why = _supported_conv(mod)
            if why is None and mod.groups > 1:
                why = "a grouped convolution reading a shared or concatenated value"
            if why is None and (
                mod.in_channels < width if lead is not None else mod.in_channels != width
            ):
                why = f"it reads {mod.in_channels} channels (the unit has {width})"
            if why is not None:
                return f"'{node.target}' cannot be a reader: {why}"
            taps = mod.kernel_size[0] * mod.kernel_size[1]
            found.append(_Reader(node.target, "conv", taps, _bn_after(node, modules), lead, after))
            continue
        elif isinstance(mod, nn.Linear) and flat:
            if not pooled:
                return (
                    f"'{node.target}' reads a flatten of maps recon cannot size (no global pooling)"
                )
            if mod.in_features < width if lead is not None else mod.in_features != width:
                return f"'{node.target}' reads {mod.in_features} features (the unit has {width})"
            found.append(_Reader(node.target, "linear", 1, _bn_after(node, modules), lead, after))
            continue
        elif isinstance(mod, nn.BatchNorm2d) and lead is not None and not flat:
            after = (*after, str(node.target))
        elif _global_pool(node, modules) and not flat:
            pooled = True
        elif (
            not _channelwise(node, modules)
            or isinstance(mod, nn.BatchNorm2d | nn.PReLU)
            or (flat and not _elementwise(node, modules))
        ):
            return _opaque(node, modules)
        nxt = _users(node)
        if not nxt:
            return f"{_describe(node, modules)} is not read by a convolution"
        todo.extend((node, u, lead, after, pooled, flat) for u in nxt)
    if len(found) == 1 and found[0].cat_lead is None:
        return "one reader, no concatenation"  # the plain path handles it
    order = {n.target: i for i, n in enumerate(value.graph.nodes) if n.op == "call_module"}
    return sorted(found, key=lambda r: order[r.consumer])


def _global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` pools every map to 1×1, keeping (B, c, 1, 1)."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) and m.output_size in (
            1,
            (1, 1),
        )
    if node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1))
    return _spatial_reduce(node) == "keep"


def _elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` acts on each entry alone (allowed after a flatten)."""
    if node.op == "call_module":
        return type(modules[node.target]) in _ELEMENTWISE_MODULES
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS or _scalar_op(node)
    return node.op == "call_method" and (node.target in _ELEMENTWISE_METHODS or _scalar_op(node))


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CAT_FUNCTIONS


def _cat_lead(cat: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, ...] | str:
    """The convs whose outputs come before ``value`` in the concatenation ``cat``, or why
    recon cannot cut along it: along dim 1, ``value`` once, each operand before it
    channel-wise ops of one conv's output (so its width is that conv's)."""
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(tensors, list | tuple) or dim not in (1, -3):
        return f"not along channels (dim={dim!r})"
    if sum(t is value for t in tensors) != 1:
        return "it concatenates the same value twice"
    lead: list[str] = []
    for t in tensors[: next(i for i, t in enumerate(tensors) if t is value)]:
        convs = _widths(t, modules)
        if isinstance(convs, str):
            return convs
        lead += convs
    return tuple(lead)


def _widths(operand: fx.Node, modules: dict[str, nn.Module]) -> list[str] | str:
    """The convs whose output channels make up ``operand`` (one, or those of a nested
    concatenation's operands), or why recon cannot tell its width."""
    cur = operand
    while isinstance(cur, fx.Node) and not _is_conv(cur, modules) and not _is_cat(cur):
        if not (_channelwise(cur, modules) and len(cur.all_input_nodes) == 1):
            break
        cur = cur.all_input_nodes[0]
    if _is_conv(cur, modules):
        return [str(cur.target)]
    if isinstance(cur, fx.Node) and _is_cat(cur):
        tensors = cur.args[0] if cur.args else cur.kwargs.get("tensors")
        dim = cur.args[1] if len(cur.args) > 1 else cur.kwargs.get("dim", 0)
        if isinstance(tensors, list | tuple) and dim in (1, -3):
            out: list[str] = []
            for t in tensors:
                convs = _widths(t, modules)
                if isinstance(convs, str):
                    return convs
                out += convs
            return out
    return f"recon cannot tell the width of its operand '{operand}': not a conv's output"


def _se_gate(
    value: fx.Node, mul: fx.Node, modules: dict[str, nn.Module], width: int
) -> tuple[str, str] | str:
    """The ``(fc1, fc2)`` of a squeeze-and-excitation gate ``value * gate(value)``, or why
    recon cannot cut it: ``value`` pooled to 1×1, a 1×1 conv from ``width`` channels,
    element-wise ops, a 1×1 conv back to ``width``, element-wise ops, into ``mul``."""
    pools = [u for u in _users(value) if u is not mul]
    if len(pools) != 1:
        return f"{len(pools)} other readers"
    cur = pools[0]
    if not _global_pool(cur, modules):
        return f"it does not start with a global pooling: {_describe(cur, modules)}"
    convs: list[str] = []
    while True:
        users = _users(cur)
        if len(users) != 1:
            return f"{_describe(cur, modules)} has {len(users)} readers"
        cur = users[0]
        if cur is mul:
            break
        if cur.op == "call_module" and isinstance(modules[cur.target], nn.Conv2d):
            conv = modules[cur.target]
            ok = _supported_conv(conv) is None and conv.groups == 1
            if not ok or conv.kernel_size != (1, 1) or len(convs) == 2:
                return f"'{cur.target}' is not a 1×1 squeeze or excitation conv"
            convs.append(str(cur.target))
        elif not (_channelwise(cur, modules) and len(cur.all_input_nodes) == 1):
            return f"{_describe(cur, modules)} is not element-wise"
    if len(convs) != 2:
        return f"{len(convs)} convolution(s), not a squeeze and an excitation"
    fc1, fc2 = (modules[c] for c in convs)
    if fc1.in_channels != width or fc2.out_channels != width:
        return f"'{convs[0]}' reads {fc1.in_channels}, '{convs[1]}' writes {fc2.out_channels}"
    return convs[0], convs[1]


_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MAX_GATE = 64  # nodes searched above a gate for the value it multiplies


def _gate(value: fx.Node, users: list[fx.Node]) -> fx.Node | None:
    """A user of ``value`` that multiplies it by a tensor computed from it, or None.

    Squeeze-and-excitation: ``x * sigmoid(fc2(relu(fc1(pool(x)))))``.
    """
    for user in users:
        mul = (user.op == "call_function" and user.target in _MUL_FUNCTIONS) or (
            user.op == "call_method" and user.target in ("mul", "mul_")
        )
        others = [a for a in user.all_input_nodes if a is not value]
        if mul and others and all(_reads(a, value) for a in others):
            return user
    return None


def _reads(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` is computed from ``value`` (searching a few nodes up)."""
    todo, seen = [node], set()
    while todo and len(seen) < _MAX_GATE:
        cur = todo.pop()
        if cur is value:
            return True
        if cur not in seen:
            seen.add(cur)
            todo.extend(cur.all_input_nodes)
    return False


def _opaque(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    return f"its output flows into {_describe(node, modules)}, which recon cannot see through"


def _bn_after(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        if isinstance(modules[users[0].target], nn.BatchNorm2d | nn.BatchNorm1d):
            return users[0].target
    return None
