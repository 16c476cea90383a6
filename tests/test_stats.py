"""Streaming sufficient statistics against sums computed on materialised samples."""

from __future__ import annotations

import pytest
import torch

from recon.stats import ChannelStats, PatchStats, channel_gram


def data(seed: int, N: int = 60, c: int = 4, k: int = 9, n: int = 5):
    """Patches X (N, c*k), targets Y (N, n), not centred, float32 like a model's activations."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c * k, generator=g) + torch.randn(1, c * k, generator=g)
    Y = torch.randn(N, n, generator=g) + 0.5
    return X, Y


def accumulate(X, Y, c, k, splits) -> PatchStats:
    st = PatchStats(c, k, Y.shape[1])
    for xb, yb in zip(X.split(splits), Y.split(splits), strict=True):
        st.update(xb, yb)
    return st


def reference(X, Y):
    X, Y = X.double(), Y.double()
    return {
        "G": X.T @ X,
        "C": X.T @ Y,
        "s": X.sum(0),
        "t": Y.sum(0),
        "yy": (Y * Y).sum(),
    }


def contributions(X, W):
    """Z (c, N, n): Z_i = X_i W_iᵀ, channel i's contribution to every output of every sample."""
    n, c = W.shape[:2]
    Xc = X.double().reshape(X.shape[0], c, -1)
    return torch.einsum("bck,nck->cbn", Xc, W.double().reshape(n, c, -1))


@pytest.mark.parametrize("splits", [60, 1, 7, [10, 25, 25], [59, 1]])
def test_update_in_batches_equals_sums_at_once(splits):
    X, Y = data(0)
    st = accumulate(X, Y, 4, 9, splits)
    ref = reference(X, Y)
    for name, value in ref.items():
        got = getattr(st, name)
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-10, msg=name)
    assert st.count == 60


@pytest.mark.parametrize("folds", [1, 3])
def test_float32_blocks_sum_in_float64(folds):
    X, Y = data(1, N=500, c=8, k=9, n=6)
    fold = torch.arange(500) % folds
    st64 = PatchStats(8, 9, 6, folds=folds)
    st32 = PatchStats(8, 9, 6, folds=folds, block_dtype=torch.float32)
    for st in (st64, st32):
        for xb, yb, fb in zip(X.split(97), Y.split(97), fold.split(97), strict=True):
            st.update(xb, yb, fb if folds > 1 else None)
    ref = reference(X, Y)
    for name in ("G", "C", "s", "t", "yy"):
        got = getattr(st32, name)
        assert got.dtype == torch.float64, name
        # each block's product rounded to float32 (~6e-8 relative per term), summed exactly
        scale = float(ref[name].abs().max())
        assert float((got - ref[name]).abs().max()) <= 1e-6 * scale, name
        if name in ("G", "C"):  # the products were really made in float32
            assert not torch.equal(got, getattr(st64, name)), name
    torch.testing.assert_close(st32.s, st64.s, rtol=1e-12, atol=1e-10)  # float64 sums either way
    torch.testing.assert_close(st32.G, st32.G.T, rtol=0, atol=0)  # symmetric
    for f in range(folds):
        a, b = st32.fold(f).G, st64.fold(f).G
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())
    with pytest.raises(ValueError, match="'block_dtype' argument must be"):
        PatchStats(2, 1, 1, block_dtype=torch.float16)


def test_ieee_fp32_context_restores_the_global_setting():
    from recon import stats

    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if stats._HAS_FP32_PRECISION else "allow_tf32"
    before = getattr(matmul, name)
    with stats._ieee_fp32(torch.device("cuda")):  # sets the flag only; runs no kernel
        assert getattr(matmul, name) in ("ieee", False)
    assert getattr(matmul, name) == before
    with stats._ieee_fp32(torch.device("cpu")):
        assert getattr(matmul, name) == before


def test_fresh_accumulator_is_zero_and_shaped():
    st = PatchStats(3, 4, 2)
    assert st.G.shape == (12, 12) and st.C.shape == (12, 2)
    assert st.s.shape == (12,) and st.t.shape == (2,) and st.yy.shape == ()
    assert st.count == 0
    assert all(float(t.abs().sum()) == 0.0 for t in st.tensors())


def test_merge_of_two_halves_equals_whole():
    X, Y = data(1)
    whole = accumulate(X, Y, 4, 9, 60)
    first = accumulate(X[:23], Y[:23], 4, 9, 5)
    second = accumulate(X[23:], Y[23:], 4, 9, 11)
    merged = first.merge_(second)
    assert merged is first
    assert merged.count == whole.count == 60
    for a, b in zip(merged.tensors(), whole.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
    # the other accumulator is left as it was
    torch.testing.assert_close(second.G, reference(X[23:], Y[23:])["G"])


def test_tensors_fixed_order():
    X, Y = data(2)
    st = accumulate(X, Y, 4, 9, 20)
    Gf, Cf, sf, tf, yyf, nf, zeros, entries = st.tensors()  # per fold: one fold here
    assert zeros is st.zeros and entries is st.entries  # the APoZ counts, all-reduced too
    assert Gf is st.Gf and Cf is st.Cf and sf is st.sf and tf is st.tf and yyf is st.yyf
    assert nf is st.nf and nf.tolist() == [60.0]
    for total, per_fold in ((st.G, Gf), (st.C, Cf), (st.s, sf), (st.t, tf), (st.yy_out, yyf)):
        assert total.data_ptr() == per_fold.data_ptr()  # a view of the only fold


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kh, kw", [(3, 3), (1, 1), (3, 1)])
def test_channel_gram_equals_materialised_contributions(seed, kh, kw):
    c, n = 5, 4
    X, Y = data(seed, N=40, c=c, k=kh * kw, n=n)
    g = torch.Generator().manual_seed(100 + seed)
    W = torch.randn(n, c, kh, kw, generator=g)  # conv-shaped
    st = accumulate(X, Y, c, kh * kw, 13)
    A, b = channel_gram(st.G, st.C, W)
    Z = contributions(X, W)  # (c, N, n)
    A_ref = torch.einsum("ibn,jbn->ij", Z, Z)  # <Z_i, Z_j> over samples and outputs
    b_ref = torch.einsum("ibn,bn->i", Z, Y.double())
    assert A.shape == (c, c) and b.shape == (c,)
    assert A.dtype == b.dtype == torch.float64
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(A, A.T)
    assert float(torch.linalg.eigvalsh(A).min()) > -1e-8 * float(A.diagonal().max())
    # the same through the method, and with the taps flattened
    for A2, b2 in (st.channel_problem(W), channel_gram(st.G, st.C, W.reshape(n, c, -1))):
        torch.testing.assert_close(A2, A)
        torch.testing.assert_close(b2, b)


def test_channel_gram_known_answer():
    # one sample, two channels with one tap, one output: Z_i = x_i * w_i
    G = torch.tensor([[4.0, 6.0], [6.0, 9.0]], dtype=torch.float64)  # x = (2, 3)
    C = torch.tensor([[10.0], [15.0]], dtype=torch.float64)  # y = 5
    W = torch.tensor([[[[1.0]], [[-2.0]]]])  # (1, 2, 1, 1)
    A, b = channel_gram(G, C, W)
    torch.testing.assert_close(A, torch.tensor([[4.0, -12.0], [-12.0, 36.0]], dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([10.0, -30.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_channel_stats_equal_patch_stats(seed):
    c, k, n = 6, 4, 3
    X, Y = data(seed, N=50, c=c, k=k, n=n)
    W = torch.randn(n, c, k, generator=torch.Generator().manual_seed(seed + 7))
    patch = accumulate(X, Y, c, k, 50)
    chan = ChannelStats(W)
    for xb, yb in zip(X.split(9), Y.split(9), strict=True):
        chan.update(xb, yb)
    A, b = patch.channel_problem(W)
    A2, b2 = chan.channel_problem()
    torch.testing.assert_close(A2, A, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(b2, b, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(chan.yy, patch.yy)
    assert chan.count == patch.count == 50
    # ignores a weight argument: the weights were fixed at construction
    assert chan.channel_problem(torch.zeros(n, c, k))[0] is chan.A


def test_channel_stats_merge():
    c, k, n = 3, 2, 2
    X, Y = data(4, N=30, c=c, k=k, n=n)
    W = torch.randn(n, c, k, generator=torch.Generator().manual_seed(0))
    whole, a, b = ChannelStats(W), ChannelStats(W), ChannelStats(W)
    whole.update(X, Y)
    a.update(X[:12], Y[:12])
    b.update(X[12:], Y[12:])
    a.merge_(b)
    assert a.count == 30
    for x, y in zip(a.tensors(), whole.tensors(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-10)


def test_memory_does_not_grow_with_samples():
    c, k, n = 4, 9, 5
    W = torch.randn(n, c, k, generator=torch.Generator().manual_seed(0))
    shapes = []
    for N in (3, 300):
        X, Y = data(5, N=N, c=c, k=k, n=n)
        patch = accumulate(X, Y, c, k, 7)
        chan = ChannelStats(W)
        chan.update(X, Y)
        shapes.append([t.shape for t in patch.tensors()] + [t.shape for t in chan.tensors()])
        assert patch.count == chan.count == N
    assert shapes[0] == shapes[1]
    assert shapes[0][:8] == [(1, 36, 36), (1, 36, 5), (1, 36), (1, 5), (1, 5), (1,), (4,), ()]
    assert shapes[0][8:] == [(4, 4), (4,), (), (), (4,), ()]


def test_channel_gram_rejects_flat_weight_naming_it():
    st = PatchStats(2, 3, 4)
    with pytest.raises(ValueError, match=r"'weight'.*\(4, 6\)"):
        channel_gram(st.G, st.C, torch.zeros(4, 6))  # c cannot be told from (n, c*k)


@pytest.mark.parametrize("shape", [(5, 5), (3, 300, 300), (2, 129, 129)])
def test_mirror_equals_the_transposed_copy_bit_for_bit(shape):
    """mirror_ copies the lower triangle tile by tile: the same as tril + tril(-1)ᵀ, for
    sizes on and off the tile size, one Gram or a stack of them."""
    from recon.stats import MIRROR_TILE, mirror_

    assert MIRROR_TILE < 300
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = G.tril() + G.tril(-1).mT
    assert torch.equal(mirror_(G.clone()), expected)


def test_gram_rows_and_restricted_statistics_equal_the_totals():
    """gram() reads rows of the total G without summing whole Grams; restrict(keep) holds
    the kept channels' sums of every fold."""
    X, Y = data(3, N=40, c=6, k=3)
    st = PatchStats(6, 3, Y.shape[1], folds=3)
    for xs, ys, fs in zip(X.split(7), Y.split(7), (torch.arange(40) % 3).split(7), strict=True):
        st.update(xs, ys, fs)  # folds left dirty (lower triangles only)
    gram = st.gram()
    index = torch.tensor([17, 2, 9])
    torch.testing.assert_close(gram.rows(index), st.G[index], rtol=1e-14, atol=0)
    torch.testing.assert_close(gram.diag, st.G.diagonal(), rtol=1e-14, atol=0)
    assert torch.equal(gram.full(), st.G)
    keep = torch.tensor([0, 3, 4])
    idx = (keep[:, None] * 3 + torch.arange(3)).flatten()
    sub = st.restrict(keep)
    assert (sub.channels, sub.taps, sub.folds, sub.count) == (3, 3, 3, 40)
    assert torch.equal(sub.Gf, st.Gf[:, idx][:, :, idx])
    for name in ("C", "s"):
        assert torch.equal(getattr(sub, name + "f"), getattr(st, name + "f")[:, idx])
    assert torch.equal(sub.G, st.G[idx][:, idx]) and float(sub.yy) == float(st.yy)
    assert st.kept_blocks(torch.arange(18)) is st.Gf  # every entry in order: no copy
