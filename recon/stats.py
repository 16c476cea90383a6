"""Streaming float64 sufficient statistics of one consumer layer.

A consumer layer maps an input patch ``x`` (``d = c*k`` numbers: ``c`` input channels
times ``k`` kernel taps, channel-major) to an output ``y`` (``n`` numbers, bias
removed). Everything recon computes about a layer -- channel Grams, LASSO, least
squares, errors -- is a function of the sums below, so samples are never stored and
memory does not grow with the number of calibration images.

This module sees tensors only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import scipy.linalg.blas
import torch
from torch import Tensor

from .lowrank import Gram

__all__ = ["ChannelStats", "PatchStats", "add_gram_", "channel_gram", "mirror_", "zero_counts"]


@dataclass
class PatchStats:
    """Sums over samples of patch ``x`` (length ``d = c*k``) and target ``y`` (length ``n``).

    With ``folds = K > 1`` the samples are split into ``K`` folds (by image, chosen by
    the caller) and every sum is kept per fold: the totals are the sums over folds,
    and :meth:`fold` / :meth:`rest` give one fold's sums and the sums of the others,
    from which held-out errors follow exactly (:func:`recon.solve.cv_lstsq`). Each
    sample is added to one fold only, so the cost of :meth:`update` does not grow
    with ``K``; memory is ``K`` Grams.

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
    yy : Tensor, shape ()
        ``Σ yᵀy``.
    yy_out : Tensor, shape (n,)
        ``Σ y∘y``, per output (``yy`` is its sum).
    count : int
        Number of samples.
    Gf, Cf, sf, tf, yyf, nf : Tensor
        The same sums per fold, with a leading fold dimension of size ``K``
        (``nf`` holds the sample counts, as float64).
    zeros : Tensor, shape (c,)
        Exact zeros per channel in the activation the consumer reads, over every
        position of every image given to :meth:`count_zeros` (all folds together).
    entries : Tensor, shape ()
        Values per channel behind ``zeros`` (float64); ``zeros / entries`` is the
        channel's APoZ (:attr:`apoz`).
    block_dtype : torch.dtype
        The precision of each update's products ``xᵀx`` and ``xᵀy`` (float64 or
        float32); every sum is kept in float64 whatever it is. float32 blocks (of at
        most a few thousand rows, :mod:`recon.gather`) take single-precision BLAS
        (``ssyrk``/``sgemm``), about twice as fast per multiply-add, with a rounding
        error of about 1e-6 of the Gram's scale: below what matters where the Gram is
        well conditioned, but as large as the ridge the solvers add (1e-6 of the mean
        diagonal), so where there are fewer samples than patch entries the solutions
        change with the blocks (see ``recon.prune``'s ``block_dtype``). The sums ``Σx``,
        ``Σy``, ``Σy²`` are float64 products either way.
    """

    channels: int
    taps: int
    outputs: int
    device: torch.device | str = "cpu"
    folds: int = 1
    block_dtype: torch.dtype = torch.float64
    Cf: Tensor = field(init=False, repr=False)
    sf: Tensor = field(init=False, repr=False)
    tf: Tensor = field(init=False, repr=False)
    yyf: Tensor = field(init=False, repr=False)
    nf: Tensor = field(init=False, repr=False)
    zeros: Tensor = field(init=False, repr=False)
    entries: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 1:
            raise ValueError(
                f"The 'folds' argument must be an int >= 1. Got {self.folds!r} instead."
            )
        if self.block_dtype not in (torch.float64, torch.float32):
            raise ValueError(
                "The 'block_dtype' argument must be torch.float64 or torch.float32. "
                f"Got {self.block_dtype!r} instead."
            )
        d, n, K = self.channels * self.taps, self.outputs, self.folds
        kw = {"dtype": torch.float64, "device": self.device}
        self._Gf = torch.zeros(K, d, d, **kw)  # lower triangles of folds in _dirty
        self._dirty: set[int] = set()
        self.Cf = torch.zeros(K, d, n, **kw)
        self.sf = torch.zeros(K, d, **kw)
        self.tf = torch.zeros(K, n, **kw)
        self.yyf = torch.zeros(K, n, **kw)
        self.nf = torch.zeros(K, **kw)
        self.zeros = torch.zeros(self.channels, **kw)
        self.entries = torch.zeros((), **kw)
        self._totals: dict[str, Tensor] = {}

    @property
    def Gf(self) -> Tensor:
        """``Σ x xᵀ`` per fold, (K, d, d); mirrors the triangles updated since last read."""
        for f in sorted(self._dirty):
            mirror_(self._Gf[f])
        self._dirty.clear()
        return self._Gf

    @Gf.setter
    def Gf(self, value: Tensor) -> None:
        self._Gf, self._dirty = value, set()

    # Totals: views of the only fold when K = 1, else sums over folds (cached until the
    # sums change; ``tensors()`` hands them out for in-place all-reduce, so it clears too).
    def _total(self, name: str) -> Tensor:
        if name == "G" and self.folds > 1:  # sum the lower triangles, mirror once
            if "G" not in self._totals:
                G = self._Gf.sum(0)
                self._totals["G"] = mirror_(G) if self._dirty else G
            return self._totals["G"]
        per_fold = getattr(self, name + "f")
        if self.folds == 1:
            return per_fold[0]
        if name not in self._totals:
            self._totals[name] = per_fold.sum(0)
        return self._totals[name]

    def kept_blocks(self, idx: Tensor) -> Tensor:
        """``G_f[idx][:, idx]`` for every fold, (K, m, m); :attr:`Gf` itself (not a copy)
        where ``idx`` is every patch entry in order."""
        Gf = self.Gf  # mirrored in place, by tiles: cheaper than mirroring the gathered blocks
        d = Gf.shape[1]
        if idx.numel() == d and bool((idx == torch.arange(d, device=idx.device)).all()):
            return Gf
        return Gf[:, idx[:, None], idx[None, :]]  # one gather, no (K, m, d) copy

    def gram(self) -> Gram:
        """The total ``G`` read by rows (:class:`recon.lowrank.Gram`): a solver that needs
        only some of its rows (a pivoted Cholesky factor) never sums whole Grams."""
        Gf = self.Gf
        if self.folds == 1 or "G" in self._totals:
            return Gram.of(self.G)
        diag = Gf.diagonal(dim1=1, dim2=2).sum(0)
        return Gram(diag, lambda index: Gf[:, index].sum(0), lambda: self.G)

    def restrict(self, keep: Tensor) -> PatchStats:
        """The statistics of the kept channels ``keep`` (m,) alone, every fold's, ``m*k``
        patch entries: a re-fit on them never gathers from the whole Grams again. For
        reading only: the sums of ``y`` (and, where ``keep`` is every channel in order, the
        Grams) are this accumulator's own tensors."""
        keep = keep.to(self._Gf.device)
        idx = (keep[:, None] * self.taps + torch.arange(self.taps, device=keep.device)).flatten()
        out = self._from_sums(
            [self.kept_blocks(idx), self.Cf[:, idx], self.sf[:, idx], self.tf, self.yyf, self.nf]
        )
        out.channels, out.folds = int(keep.numel()), self.folds
        out.zeros, out.entries = self.zeros[keep], self.entries
        return out

    @property
    def G(self) -> Tensor:
        return self._total("G")

    @property
    def C(self) -> Tensor:
        return self._total("C")

    @property
    def s(self) -> Tensor:
        return self._total("s")

    @property
    def t(self) -> Tensor:
        return self._total("t")

    @property
    def yy(self) -> Tensor:
        return self._total("yy").sum()

    @property
    def yy_out(self) -> Tensor:
        return self._total("yy")

    @property
    def count(self) -> int:
        return round(float(self.nf.sum()))

    @property
    def apoz(self) -> Tensor:
        """Average Percentage of Zeros per channel, (c,) float64 (see :meth:`count_zeros`)."""
        return _apoz(self.zeros, self.entries)

    def count_zeros(self, activation: Tensor) -> None:
        """Add the exact zeros of each channel of ``activation`` to :attr:`zeros`.

        ``activation`` is what the consumer reads for a batch: (B, c, H, W), or
        (B, c*k) channel-major before a linear consumer. See :func:`zero_counts`.
        """
        z, e = zero_counts(activation, self.channels)
        self.zeros += z.to(self.zeros.device)
        self.entries += e

    def update(self, x: Tensor, y: Tensor, fold: Tensor | int | None = None) -> None:
        """Add a batch of samples: ``x`` (N, c*k) patches, ``y`` (N, n) targets.

        ``fold`` is each sample's fold, an int for all of them or a (N,) integer
        tensor; it may be omitted when there is one fold.
        """
        if fold is None:
            if self.folds > 1:
                raise ValueError(
                    f"The 'fold' argument must give each sample's fold (0..{self.folds - 1}) "
                    "for statistics kept per fold. Got None instead."
                )
            fold = 0
        x = x.to(self._Gf.device, self.block_dtype)
        y = y.to(self._Gf.device, self.block_dtype)
        self._totals.clear()
        if isinstance(fold, int):
            self._add(fold, x, y)
            return
        fold = fold.to(x.device)
        if fold.numel() and (int(fold.min()) < 0 or int(fold.max()) >= self.folds):
            bad = int(fold.min()) if int(fold.min()) < 0 else int(fold.max())
            raise ValueError(
                f"The 'fold' argument must be in 0..{self.folds - 1}. Got {bad} instead."
            )
        order = torch.argsort(fold, stable=True)  # one gather, then a slice per fold
        x, y = x[order], y[order]
        counts = torch.bincount(fold, minlength=self.folds).tolist()
        start = 0
        for f, count in enumerate(counts):
            if count:
                self._add(f, x[start : start + count], y[start : start + count])
            start += count

    def _add(self, f: int, x: Tensor, y: Tensor) -> None:
        if not 0 <= f < self.folds:
            raise ValueError(
                f"The 'fold' argument must be in 0..{self.folds - 1}. Got {f} instead."
            )
        with _ieee_fp32(x.device):
            add_gram_(self._Gf[f], x, mirror=False)
            if x.dtype == torch.float64:
                self.Cf[f].addmm_(x.T, y)
            else:  # the block's product in x's precision, summed in float64
                self.Cf[f] += x.T @ y
        self._dirty.add(f)
        self.sf[f] += x.sum(0, dtype=torch.float64)
        self.tf[f] += y.sum(0, dtype=torch.float64)
        self.yyf[f] += y.double().square().sum(0)
        self.nf[f] += x.shape[0]

    def merge_(self, other: PatchStats) -> PatchStats:
        """Add another accumulator's sums into this one (e.g. from another shard)."""
        if other.folds != self.folds:
            raise ValueError(
                f"The 'other' argument must have {self.folds} folds. Got {other.folds} instead."
            )
        for name in ("Gf", "Cf", "sf", "tf", "yyf", "nf", "zeros", "entries"):
            getattr(self, name).add_(getattr(other, name).to(self.Gf.device))
        self._totals.clear()
        return self

    def tensors(self) -> list[Tensor]:
        """The summed tensors, in a fixed order (for in-place all-reduce): the six sums
        per fold, then the zero counts :attr:`zeros` and :attr:`entries`."""
        self._totals.clear()
        return [self.Gf, self.Cf, self.sf, self.tf, self.yyf, self.nf, self.zeros, self.entries]

    def fold(self, f: int) -> PatchStats:
        """Fold ``f``'s sums, as statistics of one fold (views, not copies)."""
        return self._from_sums([t[f : f + 1] for t in self._per_fold()])

    def rest(self, f: int) -> PatchStats:
        """The sums of every fold but ``f``, as statistics of one fold."""
        return self._from_sums([(t.sum(0) - t[f])[None] for t in self._per_fold()])

    def _per_fold(self) -> list[Tensor]:
        return [self.Gf, self.Cf, self.sf, self.tf, self.yyf, self.nf]

    def _from_sums(self, sums: list[Tensor]) -> PatchStats:
        out = PatchStats.__new__(PatchStats)
        out.channels, out.taps, out.outputs = self.channels, self.taps, self.outputs
        out.device, out.folds, out._totals, out._dirty = self.device, 1, {}, set()
        out.block_dtype = self.block_dtype
        out.Gf, out.Cf, out.sf, out.tf, out.yyf, out.nf = sums
        out.zeros, out.entries = self.zeros, self.entries  # not kept per fold
        return out

    def channel_problem(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The channel Gram ``A`` and cross term ``b`` for consumer weight ``weight``.

        See :func:`channel_gram`.
        """
        return channel_gram(self.G, self.C, weight)


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """float32 products on CUDA in full precision (no TF32, whose 10-bit mantissa would
    cost the statistics three decimal digits), whatever the user's global setting."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 says fp32_precision; older versions allow_tf32
    name, value = ("fp32_precision", "ieee") if _HAS_FP32_PRECISION else ("allow_tf32", False)
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


try:
    torch.backends.cuda.matmul.fp32_precision  # noqa: B018 (a probe)
    _HAS_FP32_PRECISION = True
except AttributeError:
    _HAS_FP32_PRECISION = False


#: Tile size of :func:`mirror_`.
MIRROR_TILE = 128


def mirror_(G: Tensor) -> Tensor:
    """Copy the lower triangle of ``G`` (..., d, d) onto its upper one, in place.

    Tile by tile: a whole transposed copy (``G.tril() + G.tril(-1).mT``) reads memory
    with a stride of ``d`` and allocates two more Grams, about 15 times slower on a
    4608 × 4608 Gram. The result is the same, bit for bit.
    """
    d = G.shape[-1]
    for a in range(0, d, MIRROR_TILE):
        b = min(a + MIRROR_TILE, d)
        for c in range(b, d, MIRROR_TILE):
            e = min(c + MIRROR_TILE, d)
            G[..., a:b, c:e] = G[..., c:e, a:b].mT
        D = G[..., a:b, a:b]
        D.copy_(D.tril() + D.tril(-1).mT)
    return G


def add_gram_(G: Tensor, x: Tensor, *, mirror: bool = True) -> Tensor:
    """``G += xᵀx`` in place, for a symmetric float64 ``G`` (d, d) and ``x`` (N, d).

    On the CPU this is a BLAS symmetric rank-k update (``dsyrk``, or ``ssyrk`` for a
    float32 ``x``, its result added to ``G`` in float64): half the multiply-adds of a
    general product, since only one triangle is computed; the other is mirrored from
    it (``mirror=False`` leaves that to the caller: only the lower triangle is then up
    to date). Elsewhere (CUDA) it is a general product, ``x``'s dtype, summed into ``G``.
    """
    if G.device.type != "cpu" or G.dtype != torch.float64 or not G.is_contiguous():
        return G.addmm_(x.T, x) if x.dtype == G.dtype else G.add_(x.T @ x)
    if x.shape[0] == 0:
        return G
    if x.dtype == torch.float32:
        # ssyrk's F-order upper triangle is the C-order lower one (see below)
        low = scipy.linalg.blas.ssyrk(1.0, x.detach().numpy().T, trans=0, lower=0)
        G.add_(torch.from_numpy(low.T))  # its other triangle is zeros (unused)
    else:
        # G's memory read column-major (a Fortran-order view) is Gᵀ = G. dsyrk adds xᵀx
        # to that view's upper triangle, i.e. to G's lower one, which is then mirrored.
        g = G.numpy().T  # (d, d), Fortran order: a view, updated in place
        scipy.linalg.blas.dsyrk(1.0, x.detach().numpy().T, beta=1.0, c=g, trans=0, overwrite_c=1)
    if mirror:
        mirror_(G)
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
    n: Tensor = field(init=False, repr=False)  # sample count, float64 (for all-reduce)
    zeros: Tensor = field(init=False, repr=False)  # (c,) as in PatchStats
    entries: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _, c, _ = self.weight.shape
        kw = {"dtype": torch.float64, "device": self.device}
        self.weight = self.weight.to(self.device, torch.float64)
        self.A = torch.zeros(c, c, **kw)
        self.b = torch.zeros(c, **kw)
        self.yy = torch.zeros((), **kw)
        self.n = torch.zeros((), **kw)
        self.zeros = torch.zeros(c, **kw)
        self.entries = torch.zeros((), **kw)

    @property
    def count(self) -> int:
        """Number of samples."""
        return round(float(self.n))

    @property
    def apoz(self) -> Tensor:
        """Average Percentage of Zeros per channel, as :attr:`PatchStats.apoz`."""
        return _apoz(self.zeros, self.entries)

    def count_zeros(self, activation: Tensor) -> None:
        """As :meth:`PatchStats.count_zeros`."""
        z, e = zero_counts(activation, self.weight.shape[1])
        self.zeros += z.to(self.zeros.device)
        self.entries += e

    def update(self, x: Tensor, y: Tensor, fold: Tensor | int | None = None) -> None:
        """Add samples: ``x`` (N, c*k) inputs, ``y`` (N, n) targets (``fold`` is ignored)."""
        _, c, k = self.weight.shape
        x = x.to(self.A.device, torch.float64).reshape(-1, c, k)
        y = y.to(self.A.device, torch.float64)
        z = torch.einsum("bck,nck->bcn", x, self.weight)  # (N, c, n) contributions
        self.A += torch.einsum("bin,bjn->ij", z, z)
        self.b += torch.einsum("bin,bn->i", z, y)
        self.yy += (y * y).sum()
        self.n += x.shape[0]

    def merge_(self, other: ChannelStats) -> ChannelStats:
        for name in ("A", "b", "yy", "n", "zeros", "entries"):
            getattr(self, name).add_(getattr(other, name).to(self.A.device))
        return self

    def tensors(self) -> list[Tensor]:
        """The summed tensors, in a fixed order (for in-place all-reduce)."""
        return [self.A, self.b, self.yy, self.n, self.zeros, self.entries]

    def channel_problem(self, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.A, self.b


class GroupedStats:
    """The statistics of a grouped consumer: one accumulator per group.

    Group ``g`` of a conv with ``groups`` groups reads only channels ``g·c/G ..`` and
    writes only outputs ``g·n/G ..`` (:mod:`recon.groups`), so its problem needs only
    those channels' patches and those outputs: ``G`` Grams of ``(c·k/G)²`` instead of
    one of ``(c·k)²``. ``parts[g]`` is group ``g``'s :class:`PatchStats` (or
    :class:`ChannelStats` when even one group's patch is too long);
    :meth:`subset` hands it out.
    """

    def __init__(self, parts: list[PatchStats | ChannelStats], taps: int) -> None:
        self.parts = parts
        self.taps = taps
        self.folds = getattr(parts[0], "folds", 1)
        self._cpg = _channels_of(parts[0])
        self._npg = _outputs_of(parts[0])

    @property
    def channels(self) -> int:
        return self._cpg * len(self.parts)

    @property
    def count(self) -> int:
        return self.parts[0].count

    @property
    def yy(self) -> Tensor:
        return sum(p.yy for p in self.parts)

    @property
    def apoz(self) -> Tensor:
        return torch.cat([p.apoz for p in self.parts])

    def count_zeros(self, activation: Tensor) -> None:
        """As :meth:`PatchStats.count_zeros`, each group's channels to its part."""
        z, e = zero_counts(activation, self.channels)
        for g, part in enumerate(self.parts):
            part.zeros += z[g * self._cpg : (g + 1) * self._cpg].to(part.zeros.device)
            part.entries += e

    def update(self, x: Tensor, y: Tensor, fold: Tensor | int | None = None) -> None:
        """Add samples: ``x`` (N, c*k) channel-major patches, ``y`` (N, n) targets."""
        d = self._cpg * self.taps
        for g, part in enumerate(self.parts):
            xg, yg = x[:, g * d : (g + 1) * d], y[:, g * self._npg : (g + 1) * self._npg]
            part.update(xg, yg) if fold is None else part.update(xg, yg, fold)

    def tensors(self) -> list[Tensor]:
        """Every part's summed tensors, in order (for in-place all-reduce)."""
        return [t for p in self.parts for t in p.tensors()]

    def subset(self, channels: slice, outputs: slice) -> PatchStats | ChannelStats:
        """Group ``g``'s statistics (not a copy), for its channel and output slices."""
        g = channels.start // self._cpg
        want = (
            slice(g * self._cpg, (g + 1) * self._cpg),
            slice(g * self._npg, (g + 1) * self._npg),
        )
        if (channels, outputs) != want:
            raise ValueError(
                f"The 'channels' and 'outputs' arguments must be one group's slices {want}. "
                f"Got {(channels, outputs)} instead."
            )
        return self.parts[g]


def _channels_of(stats: PatchStats | ChannelStats) -> int:
    return stats.channels if isinstance(stats, PatchStats) else stats.weight.shape[1]


def _outputs_of(stats: PatchStats | ChannelStats) -> int:
    return stats.outputs if isinstance(stats, PatchStats) else stats.weight.shape[0]


def zero_counts(activation: Tensor, channels: int) -> tuple[Tensor, float]:
    """Exact zeros per channel of an activation, and the values per channel counted.

    The streaming sums behind APoZ (Hu et al., 2016, "Network Trimming"): for channel
    ``i``, ``APoZ_i = Σ [a_i = 0] / Σ 1`` over every image and position.

    Parameters
    ----------
    activation : Tensor, shape (B, c, ...) or (B, c*k)
        A batch of the activation a consumer reads (e.g. after a ReLU), channel-major
        when flattened.
    channels : int
        ``c``.

    Returns
    -------
    zeros : Tensor, shape (c,), float64
    entries : float
        Values per channel in the batch (``B`` times the positions per channel).

    Examples
    --------
    >>> a = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # (B=1, c=2, 2)
    >>> zero_counts(a, 2)
    (tensor([1., 2.], dtype=torch.float64), 2.0)
    """
    flat = activation.detach().reshape(activation.shape[0], channels, -1)  # (B, c, positions)
    zeros = (flat == 0).sum(dim=(0, 2), dtype=torch.int64).to(torch.float64)
    return zeros, float(flat.shape[0] * flat.shape[2])


def _apoz(zeros: Tensor, entries: Tensor) -> Tensor:
    return zeros / entries if float(entries) > 0 else torch.zeros_like(zeros)
