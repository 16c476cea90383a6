"""Layers recon puts into a pruned network: the sampler layer, and attention with fewer heads.

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

Removing heads from ``nn.MultiheadAttention`` leaves fewer heads than its
``embed_dim // head_dim``, which that class cannot hold (its heads always span the
input width). :class:`HeadAttention` is self-attention with any number of heads of a
given size, under the same parameter names, so a state dict keeps its keys::

    x (B, T, E) -> in_proj (3·h·d) -> h heads of size d -> out_proj (h·d -> E)

:class:`WindowHeadAttention` is the same for torchvision's Swin window attention
(``ShiftedWindowAttention``: ``qkv``, ``proj`` and a relative position bias per head).

This module sees modules only.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

__all__ = [
    "HeadAttention",
    "SampledConv2d",
    "Sampler",
    "WindowHeadAttention",
    "attention_heads",
    "head_outputs",
    "is_window_attention",
]


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


class HeadAttention(nn.Module):
    """Batch-first self-attention with ``num_heads`` heads of ``head_dim`` features.

    Called as ``nn.MultiheadAttention`` is in self-attention, ``attn(x, x, x,
    need_weights=False)``, it returns ``(output, None)``. Build one from an
    ``nn.MultiheadAttention`` with :meth:`from_mha`.

    Parameters
    ----------
    embed_dim : int
        Features in and out, ``E``.
    num_heads, head_dim : int
    bias : bool
        Whether the projections have biases.
    dropout : float
        On the attention weights, in training.

    Examples
    --------
    >>> mha = nn.MultiheadAttention(8, 4, batch_first=True)
    >>> attn = HeadAttention.from_mha(mha, [0, 3])
    >>> x = torch.randn(2, 5, 8)
    >>> attn(x, x, x, need_weights=False)[0].shape, attn.out_proj.in_features
    (torch.Size([2, 5, 8]), 4)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout = dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_mha(
        cls, mha: nn.Module, heads: Tensor | list[int], out_weight: Tensor | None = None
    ) -> HeadAttention:
        """A copy of ``mha`` with only its heads ``heads`` (sorted, distinct).

        ``mha`` is a batch-first ``nn.MultiheadAttention`` or a :class:`HeadAttention`
        (heads numbered as it has them). ``out_weight`` (E, len(heads)·head_dim), if
        given, replaces the output projection's sliced columns. ``mha`` is not changed.
        """
        if isinstance(mha, nn.MultiheadAttention):
            if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None:
                raise TypeError(
                    "The 'mha' argument must be a batch-first nn.MultiheadAttention with "
                    f"one packed in_proj_weight and no bias_k/bias_v. Got {mha!r}."
                )
            h, d, p = mha.num_heads, mha.head_dim, mha.dropout
        elif isinstance(mha, HeadAttention):
            h, d, p = mha.num_heads, mha.head_dim, mha.dropout
        else:
            raise TypeError(
                f"The 'mha' argument must be an nn.MultiheadAttention or HeadAttention. "
                f"Got {type(mha).__name__}."
            )
        heads = Sampler(heads, h).index.to(mha.in_proj_weight.device)  # validated
        rows = (heads[:, None] * d + torch.arange(d, device=heads.device)).reshape(-1)
        rows = torch.cat([rows + i * h * d for i in range(3)])  # q, k and v rows
        weight = mha.in_proj_weight.detach()
        new = cls(mha.embed_dim, len(heads), d, bias=mha.in_proj_bias is not None, dropout=p)
        new.to(weight.device, weight.dtype)
        new.in_proj_weight = nn.Parameter(weight[rows].clone())
        if mha.in_proj_bias is not None:
            new.in_proj_bias = nn.Parameter(mha.in_proj_bias.detach()[rows].clone())
        cols = rows[: len(heads) * d]
        w_out = mha.out_proj.weight.detach()
        w_out = w_out[:, cols] if out_weight is None else out_weight.reshape(w_out.shape[0], -1)
        new.out_proj.weight = nn.Parameter(w_out.to(weight).clone())
        if mha.out_proj.bias is not None:
            new.out_proj.bias = nn.Parameter(mha.out_proj.bias.detach().clone())
        new.train(mha.training)
        return new

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = True, **unused
    ) -> tuple[Tensor, None]:
        o = _heads(query, self.in_proj_weight, self.in_proj_bias, self.num_heads, self.head_dim,
                   self.dropout if self.training else 0.0)  # fmt: skip
        return self.out_proj(o), None  # (B, T, E); no attention weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def _heads(x: Tensor, w: Tensor, b: Tensor | None, h: int, d: int, p: float) -> Tensor:
    """The heads' outputs before the output projection, side by side: (B, T, h·d)."""
    B, T = x.shape[0], x.shape[1]
    q, k, v = nn.functional.linear(x, w, b).reshape(B, T, 3, h, d).permute(2, 0, 3, 1, 4)
    o = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, h, T, d)
    return o.transpose(1, 2).reshape(B, T, h * d)


def is_window_attention(m: nn.Module) -> bool:
    """Whether ``m`` is torchvision's Swin (v1) window attention or a
    :class:`WindowHeadAttention` (Swin v2's cosine attention is not)."""
    if isinstance(m, WindowHeadAttention):
        return True
    return type(m).__name__ == "ShiftedWindowAttention" and all(
        hasattr(m, a) for a in ("qkv", "proj", "relative_position_bias_table", "shift_size")
    )


def attention_heads(m: nn.Module) -> tuple[int, int] | None:
    """``(heads, head_dim)`` of an attention layer recon can cut heads from, else None."""
    if isinstance(m, nn.MultiheadAttention | HeadAttention | WindowHeadAttention):
        return m.num_heads, m.head_dim
    if is_window_attention(m):  # torchvision's: head_dim = input width / heads
        return m.num_heads, m.qkv.in_features // m.num_heads
    return None


def head_outputs(attn: nn.Module, x: Tensor) -> Tensor:
    """What ``attn``'s output projection reads when it attends over ``x``: the outputs of
    its heads side by side, head ``i`` in the last dimension's ``i·head_dim ..``.

    ``attn`` is a batch-first ``nn.MultiheadAttention`` or a :class:`HeadAttention`
    (``x`` (B, T, E) -> (B, T, heads·head_dim)), or a Swin window attention (``x``
    (B, H, W, C) -> (B, H, W, heads·head_dim)); in eval mode (no dropout).
    """
    if is_window_attention(attn):
        return _window_heads(attn, x)
    return _heads(x, attn.in_proj_weight, attn.in_proj_bias, attn.num_heads, attn.head_dim, 0.0)


class WindowHeadAttention(nn.Module):
    """Swin's shifted-window self-attention with ``num_heads`` heads of ``head_dim``.

    torchvision's ``ShiftedWindowAttention`` (v1) computes its head size from its
    input width, so it cannot hold fewer heads; this layer can, under the same names
    (``qkv``, ``proj``, ``relative_position_bias_table``, ``relative_position_index``).
    Built from one with :meth:`from_swin`. Input and output (B, H, W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        window_size: list[int],
        shift_size: list[int],
        *,
        bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.attention_dropout, self.dropout = attention_dropout, dropout
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.proj = nn.Linear(inner, dim, bias=bias)
        cells = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(cells, num_heads))
        n = window_size[0] * window_size[1]
        self.register_buffer("relative_position_index", torch.zeros(n * n, dtype=torch.long))

    @classmethod
    def from_swin(
        cls, attn: nn.Module, heads: Tensor | list[int], proj_weight: Tensor | None = None
    ) -> WindowHeadAttention:
        """A copy of the window attention ``attn`` with only its heads ``heads``.

        ``proj_weight`` (C, len(heads)·head_dim), if given, replaces the output
        projection's sliced columns. ``attn`` is not changed.
        """
        if not is_window_attention(attn):
            raise TypeError(
                "The 'attn' argument must be a Swin (v1) ShiftedWindowAttention or a "
                f"WindowHeadAttention. Got {type(attn).__name__}."
            )
        h, d = attention_heads(attn)
        w = attn.qkv.weight.detach()
        heads = Sampler(heads, h).index.to(w.device)  # validated
        cols = (heads[:, None] * d + torch.arange(d, device=w.device)).reshape(-1)
        rows = torch.cat([cols + i * h * d for i in range(3)])  # q, k and v rows
        new = cls(
            attn.qkv.in_features, len(heads), d, attn.window_size, attn.shift_size,
            bias=attn.qkv.bias is not None, attention_dropout=attn.attention_dropout,
            dropout=attn.dropout,
        )  # fmt: skip
        new.to(w.device, w.dtype)
        new.qkv.weight = nn.Parameter(w[rows].clone())
        if attn.qkv.bias is not None:
            new.qkv.bias = nn.Parameter(attn.qkv.bias.detach()[rows].clone())
        w_out = attn.proj.weight.detach()
        w_out = w_out[:, cols] if proj_weight is None else proj_weight.reshape(w_out.shape[0], -1)
        new.proj.weight = nn.Parameter(w_out.to(w).clone())
        if attn.proj.bias is not None:
            new.proj.bias = nn.Parameter(attn.proj.bias.detach().clone())
        table = attn.relative_position_bias_table.detach()[:, heads]
        new.relative_position_bias_table = nn.Parameter(table.clone())
        new.relative_position_index.copy_(attn.relative_position_index)
        new.train(attn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        p = self.attention_dropout if self.training else 0.0
        return _window_heads(self, x, p, project=True)  # (B, H, W, C)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"window_size={self.window_size}, shift_size={self.shift_size}"
        )


def _window_heads(attn: nn.Module, x: Tensor, p: float = 0.0, project: bool = False) -> Tensor:
    """Swin's shifted-window attention (torchvision's ``shifted_window_attention``,
    BSD-3-Clause, with the head size given): (B, H, W, C) -> the heads' outputs (B, H, W,
    h·d), or with ``project`` the layer's output (B, H, W, C), projected (and dropped
    out) on the padded windows as torchvision does, so its FLOPs are torchvision's."""
    h, d = attention_heads(attn)
    ws, shift = list(attn.window_size), list(attn.shift_size)
    B, H, W, C = x.shape
    pad_r, pad_b = (ws[1] - W % ws[1]) % ws[1], (ws[0] - H % ws[0]) % ws[0]
    x = nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pH, pW, _ = x.shape
    if ws[0] >= pH:
        shift[0] = 0
    if ws[1] >= pW:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nW, n = (pH // ws[0]) * (pW // ws[1]), ws[0] * ws[1]
    x = x.view(B, pH // ws[0], ws[0], pW // ws[1], ws[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * nW, n, C)  # (B·nW, n, C): the windows
    qkv = nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.reshape(B * nW, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (B·nW, h, n, d) each
    a = (q * d**-0.5).matmul(k.transpose(-2, -1))  # (B·nW, h, n, n)
    table = attn.relative_position_bias_table[attn.relative_position_index]
    a = a + table.view(n, n, h).permute(2, 0, 1).unsqueeze(0)
    if sum(shift) > 0:  # tokens that the roll brought together from afar do not attend
        mask = x.new_zeros((pH, pW))
        count = 0
        for hs in ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None)):
            for wsl in ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None)):
                mask[hs[0] : hs[1], wsl[0] : wsl[1]] = count
                count += 1
        mask = mask.view(pH // ws[0], ws[0], pW // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(nW, n)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        a = (a.view(B, nW, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, h, n, n)
    a = nn.functional.dropout(a.softmax(-1), p, p > 0)
    o = a.matmul(v).transpose(1, 2).reshape(B * nW, n, h * d)
    if project:
        o = nn.functional.linear(o, attn.proj.weight, attn.proj.bias)
        o = nn.functional.dropout(o, attn.dropout, attn.training)
    c = o.shape[-1]
    o = o.view(B, pH // ws[0], pW // ws[1], ws[0], ws[1], c)
    o = o.permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, c)
    if sum(shift) > 0:
        o = torch.roll(o, shifts=(shift[0], shift[1]), dims=(1, 2))
    return o[:, :H, :W, :].contiguous()
