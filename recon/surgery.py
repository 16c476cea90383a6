"""Physical removal of channels: slicing convs, BatchNorms, depthwise convs and linears
in place, and
putting sampler layers in front of residual branches.

This module sees modules only; the re-fitted weights it installs are computed elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .graph import Unit
from .groups import dense_weight
from .layers import HeadAttention, SampledConv2d, WindowHeadAttention, is_window_attention

__all__ = [
    "apply_bias_delta",
    "channel_offset",
    "consumer_weight",
    "input_channels",
    "insert_sampler",
    "prune_unit",
    "slice_bn",
    "slice_depthwise",
    "slice_inputs",
    "slice_outputs",
]


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().to(like.dtype).clone(), requires_grad=like.requires_grad)


def channel_offset(model: nn.Module, unit: Unit) -> int:
    """Where ``unit``'s channels start in its consumer's input: 0, or after the current
    outputs of the convs before it in a concatenation (:attr:`Unit.cat_lead`)."""
    return sum(model.get_submodule(name).out_channels for name in unit.cat_lead or ())


def consumer_weight(module: nn.Conv2d | nn.Linear, unit: Unit, offset: int = 0) -> Tensor:
    """The consumer's weight on the unit's channels as ``(n, width, taps)``: dense (block
    diagonal) if grouped; the slice from ``offset`` if the unit is concatenated."""
    n = module.weight.shape[0]
    w = module.weight.detach().reshape(n, -1, unit.taps)
    if unit.cat_lead is not None:
        return w[:, offset : offset + unit.width]
    return dense_weight(w, module.groups) if isinstance(module, nn.Conv2d) else w


def input_channels(module: nn.Conv2d | nn.Linear, unit: Unit) -> int:
    """The channels a consumer of ``unit`` reads: a conv's inputs, or a linear layer's
    input features over the unit's taps."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    return module.in_features // unit.taps


def _cat_inputs(
    consumer: nn.Conv2d | nn.Linear, unit: Unit, keep: Tensor, offset: int, weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The consumer's kept input channels when ``unit``'s slice keeps ``keep`` (the
    other channels all stay), and its sliced weight with ``weight`` (n, m*taps) on
    the slice."""
    keep = keep.to(consumer.weight.device)
    total = input_channels(consumer, unit)
    full = torch.cat(
        [
            torch.arange(offset, device=keep.device),
            keep + offset,
            torch.arange(offset + unit.width, total, device=keep.device),
        ]
    )
    if weight is None:
        return full, None
    n, k = consumer.weight.shape[0], unit.taps
    new = consumer.weight.detach().reshape(n, total, k)[:, full].clone()  # (n, kept, taps)
    m = keep.numel()
    new[:, offset : offset + m] = weight.reshape(n, m, k).to(new)
    return full, new.reshape(n, -1)


def _group_counts(keep: Tensor, width: int, groups: int) -> Tensor:
    """How many of ``keep`` each of ``groups`` equal groups of ``width`` channels holds;
    a ``ValueError`` unless the counts are equal."""
    counts = torch.bincount(
        torch.div(keep, width // groups, rounding_mode="floor"), minlength=groups
    )
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"The 'keep' argument must keep as many channels of each of the {groups} groups. "
            f"Got {counts.tolist()} instead."
        )
    return counts


def slice_outputs(module: nn.Conv2d | nn.Linear, keep: Tensor) -> None:
    """Keep only output channels ``keep`` of a conv or linear layer, in place.

    A grouped conv must keep as many outputs of each group (and ``keep`` sorted).
    """
    keep = keep.to(module.weight.device)
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        _group_counts(keep, module.out_channels, module.groups)
    module.weight = _param(module.weight[keep], module.weight)
    if module.bias is not None:
        module.bias = _param(module.bias[keep], module.bias)
    if isinstance(module, nn.Conv2d):
        module.out_channels = len(keep)
    else:
        module.out_features = len(keep)


def slice_bn(bn: nn.BatchNorm2d, keep: Tensor) -> None:
    """Keep only channels ``keep`` of a BatchNorm, in place (parameters and buffers)."""
    keep = keep.to(bn.running_mean.device if bn.running_mean is not None else "cpu")
    if bn.affine:
        bn.weight = _param(bn.weight[keep], bn.weight)
        bn.bias = _param(bn.bias[keep], bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


def slice_depthwise(conv: nn.Conv2d, keep: Tensor) -> None:
    """Keep only channels ``keep`` of a depthwise conv (``groups == in == out``), in place."""
    if not conv.groups == conv.in_channels == conv.out_channels:
        raise ValueError(
            f"recon.surgery: expected a depthwise convolution (groups = in = out channels), "
            f"got groups={conv.groups}, {conv.in_channels} -> {conv.out_channels} channels"
        )
    keep = keep.to(conv.weight.device)
    conv.weight = _param(conv.weight[keep], conv.weight)  # (c, 1, kh, kw)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[keep], conv.bias)
    conv.in_channels = conv.out_channels = conv.groups = len(keep)


def slice_channelwise(module: nn.Module, keep: Tensor) -> None:
    """Keep only channels ``keep`` of a BatchNorm or depthwise conv between a producer
    and its consumer, in place."""
    if isinstance(module, nn.Conv2d):
        slice_depthwise(module, keep)
    else:
        slice_bn(module, keep)


def slice_inputs(
    module: nn.Conv2d | nn.Linear, keep: Tensor, taps: int = 1, weight: Tensor | None = None
) -> None:
    """Keep only input channels ``keep`` of a consumer, in place.

    For a linear layer after a flatten, channel ``i`` owns input features
    ``i*taps .. i*taps+taps-1``. A grouped conv must keep as many channels of each group;
    its group ``g``'s outputs keep their weights of the channels of ``keep`` in group ``g``.
    ``weight``, if given, replaces the sliced weight: shape (n, m*taps / groups) or the
    module's sliced weight shape.
    """
    dev = module.weight.device
    keep = keep.to(dev)
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        G, cpg = module.groups, module.in_channels // module.groups
        m = int(_group_counts(keep, module.in_channels, G)[0])
        local = (keep % cpg).reshape(G, m)  # (G, m) each group's kept channels
        npg = module.out_channels // G
        w = module.weight.reshape(G, npg, cpg, *module.kernel_size)
        new = w[
            torch.arange(G, device=dev)[:, None, None],
            torch.arange(npg, device=dev)[None, :, None],
            local[:, None, :],
        ]
        new = new.reshape(module.out_channels, m, *module.kernel_size)
        if weight is not None:
            new = weight.reshape(new.shape)
        module.weight = _param(new, module.weight)
        module.in_channels = len(keep)
    elif isinstance(module, nn.Conv2d):
        new = module.weight[:, keep]
        if weight is not None:
            new = weight.reshape(new.shape)
        module.weight = _param(new, module.weight)
        module.in_channels = len(keep)
    else:
        feats = (keep[:, None] * taps + torch.arange(taps, device=dev)).flatten()
        new = module.weight[:, feats]
        if weight is not None:
            new = weight.reshape(new.shape)
        module.weight = _param(new, module.weight)
        module.in_features = len(feats)


def insert_sampler(
    model: nn.Module, name: str, keep: Tensor, weight: Tensor | None = None
) -> SampledConv2d:
    """Make conv ``name`` read only its input channels ``keep``, in place.

    The conv is replaced by a :class:`~recon.layers.SampledConv2d` under the same name
    (composing with its sampler if it already has one); ``weight``, if given, replaces
    the sliced weight. Returns the new layer.
    """
    new = SampledConv2d.from_conv(model.get_submodule(name), keep, weight)
    model.set_submodule(name, new)
    return new


def _add_bias(module: nn.Conv2d | nn.Linear, delta: Tensor) -> None:
    """``module``'s bias += ``delta`` (a bias is created if it has none)."""
    dtype, dev = module.weight.dtype, module.weight.device
    delta = delta.to(dev, torch.float64)
    if module.bias is not None:
        module.bias = _param(module.bias.double() + delta, module.bias)
    else:
        module.bias = nn.Parameter(delta.to(dtype), requires_grad=module.weight.requires_grad)


def apply_bias_delta(model: nn.Module, unit: Unit, delta: Tensor) -> None:
    """Add ``delta`` (n,) to the consumer's output, keeping the architecture.

    Into the consumer's bias if it has one; else folded into a BatchNorm directly after
    it (``running_mean -= delta``); else a bias parameter is created.
    """
    consumer = model.get_submodule(unit.consumer)
    if consumer.bias is None and unit.consumer_bn is not None:
        bn = model.get_submodule(unit.consumer_bn)
        if bn.running_mean is not None:
            delta = delta.to(bn.running_mean.device, torch.float64)
            bn.running_mean.copy_((bn.running_mean.double() - delta).to(bn.running_mean.dtype))
            return
    _add_bias(consumer, delta)


def _sliced(name: str, readers: tuple[Unit, ...], reader: Unit) -> bool:
    """Whether a reader before ``reader`` cut the BatchNorm ``name`` already (readers
    after a concatenation share what lies between)."""
    for r in readers:
        if r is reader:
            return False
        if name in r.cat_after:
            return True
    return False


def prune_unit(
    model: nn.Module,
    unit: Unit,
    keep: Tensor,
    *,
    weight: Tensor | list[Tensor | None] | None = None,
    bias_delta: Tensor | list[Tensor | None] | None = None,
    gate: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Remove every channel of ``unit`` not in ``keep``, in place.

    Slices the producer's outputs, the BatchNorms and depthwise convs between, a
    squeeze-and-excitation gate's squeeze inputs and excitation outputs, and the
    consumer's inputs (only the unit's slice of them if it is concatenated); for a
    sampler unit, puts a sampler in front of the consumer instead; for attention heads,
    replaces the attention layer by a :class:`~recon.layers.HeadAttention` with the kept
    heads. Installs a re-fitted
    consumer ``weight`` (on the unit's channels) and adds ``bias_delta`` when given, and
    the gate's re-fitted squeeze weight and bias change ``gate``. A unit with several
    readers (:attr:`Unit.readers`) cuts each; ``weight`` and ``bias_delta`` are then
    lists, one entry (or None) per reader, the consumer's first.
    """
    keep = torch.as_tensor(keep, dtype=torch.long)
    readers = (unit, *unit.readers)
    weights = weight if isinstance(weight, list | tuple) else [weight] + [None] * len(unit.readers)
    deltas = bias_delta if isinstance(bias_delta, list | tuple) else [bias_delta]
    deltas = [*deltas, *[None] * (len(readers) - len(deltas))]
    cats = [  # each slice's place, before anything is cut
        None
        if r.cat_lead is None
        else _cat_inputs(model.get_submodule(r.consumer), r, keep, channel_offset(model, r), w)
        for r, w in zip(readers, weights, strict=True)
    ]
    if unit.kind == "sampler":
        insert_sampler(model, unit.consumer, keep, weight)
    elif unit.consumer_kind == "heads":  # fewer heads: a new attention layer, same name
        attn = model.get_submodule(unit.producer)
        cls = WindowHeadAttention.from_swin if is_window_attention(attn) else HeadAttention.from_mha
        model.set_submodule(unit.producer, cls(attn, keep, weights[0]))
    else:
        slice_outputs(model.get_submodule(unit.producer), keep)
        for name in unit.channelwise:
            slice_channelwise(model.get_submodule(name), keep)
        if unit.gate is not None:
            fc1, fc2 = (model.get_submodule(n) for n in unit.gate)
            slice_inputs(fc1, keep, 1, None if gate is None else gate[0])
            slice_outputs(fc2, keep)
            if gate is not None:
                _add_bias(fc1, gate[1])
        for r, w, cat in zip(readers, weights, cats, strict=True):
            if cat is None:
                slice_inputs(model.get_submodule(r.consumer), keep, r.taps, w)
                continue
            slice_inputs(model.get_submodule(r.consumer), cat[0], r.taps, cat[1])
            for name in r.cat_after:  # a BatchNorm between the concatenation and the reader
                if not _sliced(name, readers, r):
                    slice_bn(model.get_submodule(name), cat[0])
    for r, delta in zip(readers, deltas, strict=True):
        if delta is not None:
            apply_bias_delta(model, r, delta)
