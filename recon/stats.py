"""Streaming float64 sufficient statistics of one consumer layer.

A consumer layer maps an input patch ``x`` (``d = c*k`` numbers: ``c`` input channels
times ``k`` kernel taps, channel-major) to an output ``y`` (``n`` numbers, bias
removed). Everything recon computes about a layer -- channel Grams, LASSO, least
squares, errors -- is a function of the sums below, so samples are never stored and
memory does not grow with the number of calibration images.

This module sees tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import scipy.linalg.blas
import torch
from torch import Tensor

__all__ = ["ChannelStats", "PatchStats", "add_gram_", "channel_gram"]


@dataclass
class PatchStats:
    """Sums over samples of patch ``x`` (length ``d = c*k``) and target ``y`` (length ``n``).

    Attributes
    ----------
    G : Tensor, shape (d, d)
        ``Σ x xᵀ``.
    C : Tensor, shape (d, n)
        ``Σ x yᵀ``.
    s : Tensor, shape (d,)
        ``Σ x``.
    t : Tensor, shape (n,)
        ``Σ y``.
    yy : float
        ``Σ yᵀy``.
    count : int
        Number of samples.
    """

    channels: int
    taps: int
    outputs: int
    device: torch.device | str = "cpu"
    G: Tensor = field(init=False)
    C: Tensor = field(init=False)
    s: Tensor = field(init=False)
    t: Tensor = field(init=False)
    yy: Tensor = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        d, n = self.channels * self.taps, self.outputs
        kw = {"dtype": torch.float64, "device": self.device}
        self.G = torch.zeros(d, d, **kw)
        self.C = torch.zeros(d, n, **kw)
        self.s = torch.zeros(d, **kw)
        self.t = torch.zeros(n, **kw)
        self.yy = torch.zeros((), **kw)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch of samples: ``x`` (N, c*k) patches, ``y`` (N, n) targets."""
        x = x.to(self.G.device, torch.float64)
        y = y.to(self.G.device, torch.float64)
        add_gram_(self.G, x)
        self.C.addmm_(x.T, y)
        self.s += x.sum(0)
        self.t += y.sum(0)
        self.yy += (y * y).sum()
        self.count += x.shape[0]

    def merge_(self, other: PatchStats) -> PatchStats:
        """Add another accumulator's sums into this one (e.g. from another shard)."""
        for name in ("G", "C", "s", "t", "yy"):
            getattr(self, name).add_(getattr(other, name).to(self.G.device))
        self.count += other.count
        return self

    def tensors(self) -> list[Tensor]:
        """The summed tensors, in a fixed order (for all-reduce)."""
        return [self.G, self.C, self.s, self.t, self.yy]

    def channel_problem(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The channel Gram ``A`` and cross term ``b`` for consumer weight ``weight``.

        See :func:`channel_gram`.
        """
        return channel_gram(self.G, self.C, weight)


def add_gram_(G: Tensor, x: Tensor) -> Tensor:
    """``G += xᵀx`` in place, for a symmetric float64 ``G`` (d, d) and ``x`` (N, d).

    On the CPU this is a BLAS symmetric rank-k update (``dsyrk``): half the
    multiply-adds of a general product, since only one triangle is computed; the other
    is mirrored from it. Elsewhere (CUDA) it is ``G.addmm_(x.T, x)``.
    """
    if G.device.type != "cpu" or G.dtype != torch.float64 or not G.is_contiguous():
        return G.addmm_(x.T, x)
    if x.shape[0] == 0:
        return G
    # G's memory read column-major (a Fortran-order view) is Gᵀ = G. dsyrk adds xᵀx to
    # that view's upper triangle, i.e. to G's lower one, which is then mirrored.
    g = G.numpy().T  # (d, d), Fortran order: a view, updated in place
    scipy.linalg.blas.dsyrk(1.0, x.detach().numpy().T, beta=1.0, c=g, trans=0, overwrite_c=1)
    G.copy_(G.tril() + G.tril(-1).T)
    return G


def channel_gram(G: Tensor, C: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel contribution Gram and cross term from patch statistics.

    With ``W_i`` the ``(n, k)`` slice of ``weight`` for input channel ``i`` and
    ``Z_i = X_i W_iᵀ`` its contribution to the output,

    .. math::

        A_{ij} = \\langle Z_i, Z_j \\rangle
               = \\sum_{o,p,q} W_{o,i,p}\\, G_{(i,p),(j,q)}\\, W_{o,j,q},
        \\qquad b_i = \\langle Z_i, Y \\rangle = \\sum_{o,p} W_{o,i,p}\\, C_{(i,p),o}.

    Parameters
    ----------
    G : Tensor, shape (c*k, c*k)
    C : Tensor, shape (c*k, n)
    weight : Tensor, shape (n, c, k) or (n, c, kh, kw)

    Returns
    -------
    A : Tensor, shape (c, c), float64
    b : Tensor, shape (c,), float64
    """
    if weight.dim() < 3:
        raise ValueError(
            "The 'weight' argument must have shape (n, c, k) or (n, c, kh, kw). "
            f"Got shape {tuple(weight.shape)} instead."
        )
    n, c = weight.shape[:2]
    d = G.shape[0]
    w = weight.reshape(n, d).to(G.device, torch.float64)  # (n, c*k)
    k = d // c
    # A = Σ_{p,q} G[(i,p),(j,q)] (WᵀW)[(i,p),(j,q)]: one elementwise product, O((ck)²) memory.
    A = (G * (w.T @ w)).reshape(c, k, c, k).sum(dim=(1, 3))
    b = (C * w.T).reshape(c, k, -1).sum(dim=(1, 2))
    return A, b


@dataclass
class ChannelStats:
    """Channel-level sums for consumers too wide for a patch Gram.

    Used when ``c*k`` is so large that ``G`` would not fit (e.g. a conv whose output is
    flattened into a linear layer with many features per channel). Accumulates
    ``A = Σ Z Zᵀ`` and ``b = Σ Z y`` directly from the per-channel contributions
    ``Z_i = x_i W_iᵀ`` of the given (fixed) consumer weights.
    """

    weight: Tensor  # (n, c, k)
    device: torch.device | str = "cpu"
    A: Tensor = field(init=False)
    b: Tensor = field(init=False)
    yy: Tensor = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        _, c, _ = self.weight.shape
        kw = {"dtype": torch.float64, "device": self.device}
        self.weight = self.weight.to(self.device, torch.float64)
        self.A = torch.zeros(c, c, **kw)
        self.b = torch.zeros(c, **kw)
        self.yy = torch.zeros((), **kw)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add samples: ``x`` (N, c*k) inputs, ``y`` (N, n) targets."""
        _, c, k = self.weight.shape
        x = x.to(self.A.device, torch.float64).reshape(-1, c, k)
        y = y.to(self.A.device, torch.float64)
        z = torch.einsum("bck,nck->bcn", x, self.weight)  # (N, c, n) contributions
        self.A += torch.einsum("bin,bjn->ij", z, z)
        self.b += torch.einsum("bin,bn->i", z, y)
        self.yy += (y * y).sum()
        self.count += x.shape[0]

    def merge_(self, other: ChannelStats) -> ChannelStats:
        for name in ("A", "b", "yy"):
            getattr(self, name).add_(getattr(other, name).to(self.A.device))
        self.count += other.count
        return self

    def tensors(self) -> list[Tensor]:
        return [self.A, self.b, self.yy]

    def channel_problem(self, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.A, self.b
