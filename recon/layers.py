"""Layers recon puts into a pruned network: the sampler layer.

Channels that meet in a residual ``add`` are coupled across a whole stage, so they
cannot be removed. A *sampler layer* (He et al. 2017) lets a residual branch read only
some of them anyway: it index-selects the block input's channels in front of the
branch's first convolution, while the shortcut keeps them all. :class:`SampledConv2d`
is that convolution with its sampler built in, so the conv keeps its name and place in
the model::

    x (N, C, H, W) -> x[:, index] (N, c, H, W) -> conv (c -> n)

On channels_last CPU input with more positions (N·H·W) than output channels, a 1x1
:class:`SampledConv2d` skips the gather (which would copy the whole input along its
innermost dimension) and convolves all ``C`` channels with a weight that is zero
outside ``index``: the same output, several times faster (``scripts/sampler_layout.py``).

This module sees modules only.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["SampledConv2d", "Sampler"]


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` (N, C, H, W) is stored channels_last and not also contiguous;
    False for torch.fx's symbolic tracing (the traced graph selects the channels)."""
    if not torch.jit.is_scripting():
        if isinstance(x, torch.fx.Proxy):
            return False
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


class Sampler(nn.Module):
    """Channel index-select: ``y = x[:, index]``.

    Parameters
    ----------
    index : sequence of int or Tensor
        Input channels to keep, in the order they are read (distinct, >= 0).
    in_channels : int
        Channels of the input the sampler reads (> every index).

    Examples
    --------
    >>> s = Sampler([2, 0], in_channels=3)
    >>> s(torch.arange(3.0).view(1, 3, 1, 1)).flatten().tolist()
    [2.0, 0.0]
    """

    def __init__(self, index: Tensor | list[int], in_channels: int) -> None:
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if index.numel() == 0:
            raise ValueError("The 'index' argument must keep at least one channel. Got none.")
        if index.unique().numel() != index.numel():
            raise ValueError(f"The 'index' argument must be distinct. Got {index.tolist()}.")
        if int(index.min()) < 0 or int(index.max()) >= in_channels:
            raise ValueError(
                f"The 'index' argument must lie in [0, {in_channels}). Got {index.tolist()}."
            )
        self.in_channels = in_channels
        self.register_buffer("index", index)

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)  # (N, C, H, W) -> (N, c, H, W)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.in_channels} channels"


class SampledConv2d(nn.Conv2d):
    """A ``Conv2d`` that reads only channels ``index`` of its input.

    ``in_channels`` is the number of channels the convolution itself reads (the length
    of ``index``); ``source_channels`` is the width of the tensor the layer is given.
    The other arguments are those of ``nn.Conv2d``. Build one from an existing
    convolution with :meth:`from_conv`.

    Examples
    --------
    >>> conv = nn.Conv2d(4, 8, 3, padding=1)
    >>> layer = SampledConv2d.from_conv(conv, [0, 3])
    >>> layer(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 8, 5, 5])
    >>> layer.in_channels, layer.sampler.in_channels
    (2, 4)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *args,
        source_channels: int | None = None,
        index: Tensor | list[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, *args, **kwargs)
        if self.groups != 1:
            raise ValueError("SampledConv2d supports groups=1 only.")
        source = in_channels if source_channels is None else source_channels
        index = torch.arange(in_channels) if index is None else index
        if len(index) != in_channels:
            raise ValueError(
                f"The 'index' argument must select in_channels={in_channels} channels. "
                f"Got {len(index)}."
            )
        self.sampler = Sampler(index, source)
        self.sampler.to(self.weight.device if self.weight.device.type != "meta" else "cpu")

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, index: Tensor | list[int], weight: Tensor | None = None
    ) -> SampledConv2d:
        """A sampled copy of ``conv`` that reads its input channels ``index``.

        ``index`` numbers ``conv``'s current input channels; when ``conv`` is already a
        :class:`SampledConv2d`, the new sampler composes with the old one. ``weight``
        (n, len(index), kh, kw), if given, replaces the sliced weight. ``conv`` itself
        is not changed.
        """
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise TypeError(f"The 'conv' argument must be a Conv2d with groups=1. Got {conv!r}.")
        dev = conv.weight.device
        index = Sampler(index, conv.in_channels).index.to(dev)  # validated: ValueError
        if isinstance(conv, SampledConv2d):
            source, inner = conv.sampler.in_channels, conv.sampler.index[index]
        else:
            source, inner = conv.in_channels, index
        new = cls(
            len(index),
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            source_channels=source,
            index=inner.cpu(),
            device="meta",
        )
        if weight is None:
            w = conv.weight.detach()[:, index]
        else:
            w = weight.detach().reshape(conv.out_channels, len(index), *conv.kernel_size)
        new.weight = nn.Parameter(
            w.to(dev, conv.weight.dtype).clone(), requires_grad=conv.weight.requires_grad
        )
        if conv.bias is not None:
            new.bias = nn.Parameter(
                conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad
            )
        new.sampler.to(dev)
        new.train(conv.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        # Not super().forward(): TorchScript cannot compile super() calls.
        if self.skips_gather(x):
            return self._conv_forward(x, self.full_weight(), self.bias)  # (N, n, H, W)
        x = self.sampler(x)  # (N, source, H, W) -> (N, c, H, W)
        return self._conv_forward(x, self.weight, self.bias)  # (N, n, H', W')

    def skips_gather(self, x: Tensor) -> bool:
        """Whether :meth:`forward` convolves ``x`` with :meth:`full_weight` instead of
        selecting its channels: a 1x1 layer, channels_last CPU input, more positions
        ``N·H·W`` than output channels."""
        # Selecting channels of a channels_last tensor gathers along its innermost
        # dimension and copies the whole input (ResNet-50's first stage at 224 px,
        # one CPU thread: 5-7x the time of the path below). A 1x1 conv over every
        # source channel, zero outside the index, gives the same output faster where
        # the input has more positions than the layer has outputs (else building that
        # weight costs more than the gather saves; measured on CPUs only,
        # scripts/sampler_layout.py: GPUs keep the gather).
        if self.kernel_size == (1, 1) and _channels_last(x) and x.device.type == "cpu":
            return x.shape[0] * x.shape[2] * x.shape[3] > self.out_channels
        return False

    def full_weight(self) -> Tensor:
        """The weight over all ``source_channels`` inputs: zero outside ``index``,
        (n, source, kh, kw). Differentiable in ``weight``."""
        n, _, kh, kw = self.weight.shape
        zeros = self.weight.new_zeros(n, self.sampler.in_channels, kh, kw)
        return zeros.index_copy(1, self.sampler.index, self.weight)
