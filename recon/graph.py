"""Discovery of prunable units in a model's ``torch.fx`` graph.

A *unit* is a producer whose output channels can be removed together with the consumer
inputs that read them::

    producer conv -> [BN | ReLU | pooling | dropout | identity]* -> consumer conv
    producer conv -> [...]* -> flatten -> [ReLU | dropout]* -> consumer linear

Each channel-wise op in between must have the producer's output as its only input and
a single user; a value with several users (a residual ``add``, a concatenation, a
second head) couples channels and ends the search with a recorded reason. Units are
found from the graph, not from class names, so any model built from standard layers
works. This module sees modules only.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Graph", "Unit", "find_units", "trace"]

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


@dataclass(frozen=True)
class Unit:
    """A producer layer whose output channels can be removed, and what reads them.

    Attributes
    ----------
    name : str
        The producer's qualified module name (the name used in budgets and reports).
    producer : str
        Same as ``name`` for plain units.
    consumer : str
        Module that reads the producer's channels (a conv, or a linear after flatten).
    consumer_kind : {"conv", "linear"}
    channelwise : tuple of str
        BatchNorm modules between producer and consumer, sliced with the producer.
    consumer_bn : str or None
        A BatchNorm directly after the consumer (a bias change can be folded into it).
    width : int
        Producer output channels.
    taps : int
        Consumer input features per channel: ``kh*kw`` for a conv, ``H*W`` for a linear
        after flatten.
    """

    name: str
    producer: str
    consumer: str
    consumer_kind: str
    width: int
    taps: int
    channelwise: tuple[str, ...] = ()
    consumer_bn: str | None = None


@dataclass
class Graph:
    """Units of a model in forward order, and why other convolutions are not units."""

    units: list[Unit]
    skipped: dict[str, str] = field(default_factory=dict)
    graph_module: fx.GraphModule | None = None

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear ``ValueError`` when it cannot be traced."""
    try:
        return fx.symbolic_trace(model)
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
    if not isinstance(m, nn.Conv2d) or type(m).__name__ not in ("Conv2d",):
        if isinstance(m, nn.Conv2d):
            return f"it is a {type(m).__name__}, a Conv2d subclass recon does not know"
        return "it is not a Conv2d"
    if m.groups != 1:
        return f"it is a grouped/depthwise convolution (groups={m.groups}), not supported"
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
            shared = [
                n for n in (unit_or_reason.consumer, *unit_or_reason.channelwise) if calls[n] > 1
            ]
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
    return Graph(units=units, skipped=skipped, graph_module=gm)


def _follow(node: fx.Node, producer: nn.Conv2d, modules: dict[str, nn.Module]) -> Unit | str:
    """Walk from a producer conv to its consumer; a Unit, or the reason there is none."""
    width = producer.out_channels
    name = node.target
    bns: list[str] = []
    flattened = False
    cur = node
    while True:
        users = [u for u in cur.users if not _is_size_query(u)]
        if len(users) != 1:
            what = ", ".join(_describe(u, modules) for u in users) or "nothing"
            return (
                f"its output (through {_describe(cur, modules)}) is used by {len(users)} "
                f"nodes ({what}): its channels are coupled with other layers"
            )
        nxt = users[0]
        if any(isinstance(a, fx.Node) and a is not cur for a in nxt.all_input_nodes):
            if not (nxt.op == "call_method" and nxt.target in ("view", "reshape")):
                return (
                    f"its output flows into {_describe(nxt, modules)}, which combines it "
                    "with other values: its channels are coupled"
                )
        if nxt.op == "call_module":
            mod = modules[nxt.target]
            if isinstance(mod, nn.Conv2d) and not flattened:
                why = _supported_conv(mod)
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
                    channelwise=tuple(bns),
                    consumer_bn=_bn_after(nxt, modules),
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
                    channelwise=tuple(bns),
                    consumer_bn=_bn_after(nxt, modules),
                )
            allowed = _ELEMENTWISE_MODULES if flattened else _CHANNELWISE_MODULES
            if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
                return f"it flows into '{nxt.target}' (PReLU, per-channel slopes): not supported"
            if type(mod) in allowed:
                if isinstance(mod, nn.BatchNorm2d):
                    if mod.num_features != width:
                        return f"'{nxt.target}' normalises {mod.num_features} channels, not {width}"
                    bns.append(nxt.target)
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
        elif not flattened and _flatten_kind(nxt, modules):
            flattened = True
        elif nxt.op == "call_function" and nxt.target is operator.getitem:
            return f"its output is indexed at node '{nxt.name}', which recon cannot see through"
        else:
            return _opaque(nxt, modules)
        cur = nxt


def _opaque(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    return f"its output flows into {_describe(node, modules)}, which recon cannot see through"


def _bn_after(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        if isinstance(modules[users[0].target], nn.BatchNorm2d | nn.BatchNorm1d):
            return users[0].target
    return None
