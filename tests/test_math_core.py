"""Known-answer tests of the math core against materialised samples.

The statistics path (``stats`` -> ``select`` / ``solve``) must give what the textbook
computation on stored samples gives.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso
from torch.nn import functional as F

from recon.sampling import gather_patches, gather_targets, sample_positions
from recon.select import lasso, lasso_coef, thinet
from recon.solve import channel_error, lstsq, patch_error, scale
from recon.stats import ChannelStats, PatchStats, channel_gram


def problem(seed: int, N=200, c=6, k=4, n=5, noise=0.0):
    """Patches X (N, c*k), weights W (n, c, k), targets Y (N, n) from a random linear map."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c * k, generator=g, dtype=torch.float64)
    X += torch.randn(1, c * k, generator=g, dtype=torch.float64)  # not centred
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    Y = X @ W.reshape(n, -1).T + noise * torch.randn(N, n, generator=g, dtype=torch.float64)
    return X, W, Y


def stats_of(X, Y, c, k, batches=3) -> PatchStats:
    st = PatchStats(c, k, Y.shape[1])
    for xb, yb in zip(X.chunk(batches), Y.chunk(batches), strict=True):
        st.update(xb, yb)
    return st


def contributions(X, W):
    """Z (c, N*n): channel i's contribution to every output of every sample."""
    _n, c, k = W.shape
    Xc = X.reshape(-1, c, k)
    return torch.einsum("bck,nck->cbn", Xc, W).reshape(c, -1)


@pytest.mark.parametrize("seed", range(3))
def test_channel_problem_equals_materialised(seed):
    X, W, Y = problem(seed, noise=0.3)
    c, k = W.shape[1:]
    A, b = channel_gram(stats_of(X, Y, c, k).G, stats_of(X, Y, c, k).C, W)
    Z = contributions(X, W)
    torch.testing.assert_close(A, Z @ Z.T)
    torch.testing.assert_close(b, Z @ Y.reshape(-1))
    chan = ChannelStats(W)
    for xb, yb in zip(X.chunk(4), Y.chunk(4), strict=True):
        chan.update(xb, yb)
    torch.testing.assert_close(chan.A, A)
    torch.testing.assert_close(chan.b, b)


def test_statistics_memory_does_not_grow():
    X, _W, Y = problem(0, N=50)
    small = stats_of(X, Y, 6, 4)
    X2, _, Y2 = problem(1, N=500)
    big = stats_of(X2, Y2, 6, 4)
    assert [t.shape for t in small.tensors()] == [t.shape for t in big.tensors()]
    assert big.count == 500


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.8])
def test_lasso_matches_sklearn_on_materialised_problem(seed, alpha):
    X, W, Y = problem(seed, noise=0.5, c=8)
    Z = contributions(X, W).T.numpy()  # (N*n, c) design
    y = Y.reshape(-1).numpy()
    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-10, max_iter=100_000).fit(Z, y)
    A = torch.from_numpy(Z.T @ Z)
    b = torch.from_numpy(Z.T @ y)
    beta = lasso_coef(A, b, alpha * len(y))
    np.testing.assert_array_equal(np.flatnonzero(beta.numpy()), np.flatnonzero(ref.coef_))
    np.testing.assert_allclose(beta.numpy(), ref.coef_, atol=1e-5)


def test_lasso_recovers_planted_channels():
    X, W, _ = problem(0, c=8)
    W[:, [0, 2, 3, 5, 6]] *= 0.02  # only channels 1, 4, 7 matter
    Y = X @ W.reshape(W.shape[0], -1).T
    st = stats_of(X, Y, 8, 4)
    A, b = st.channel_problem(W)
    assert lasso(A, b, 3).tolist() == [1, 4, 7]


def greedy_materialised(Z: torch.Tensor, k: int) -> list[int]:
    """ThiNet's greedy removal with every candidate evaluated on the stored samples."""
    c = Z.shape[0]
    removed: list[int] = []
    while len(removed) < c - k:
        cands = [j for j in range(c) if j not in removed]
        costs = [float(Z[[*removed, j]].sum(0).pow(2).sum()) for j in cands]
        removed.append(cands[int(np.argmin(costs))])
    return sorted(set(range(c)) - set(removed))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c", [3, 5, 8])
def test_thinet_equals_materialised_greedy(seed, c):
    X, W, _Y = problem(seed, c=c, noise=0.2)
    Z = contributions(X, W)
    A = Z @ Z.T
    for k in range(1, c + 1):
        kept = thinet(A, None, k).tolist()
        assert kept == greedy_materialised(Z, k)
        removed = [i for i in range(c) if i not in kept]
        err = float(Z[removed].sum(0).pow(2).sum()) if removed else 0.0
        best = min(
            float(Z[list(r)].sum(0).pow(2).sum()) if r else 0.0
            for r in itertools.combinations(range(c), c - k)
        )
        assert err >= best - 1e-9  # greedy is never better than exhaustive search
        if k == c - 1:
            assert err == pytest.approx(best)  # one removal: greedy is optimal


def test_lstsq_recovers_noiseless_weights_and_bias():
    X, W, _ = problem(0, c=5, k=9, n=4)
    beta = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    W[:, [1, 3]] = 0  # the true map uses channels 0, 2, 4 only
    Y = X @ W.reshape(4, -1).T + beta
    st = stats_of(X, Y, 5, 9)
    keep = torch.tensor([0, 2, 4])
    w, d = lstsq(st, keep, ridge=0.0)
    torch.testing.assert_close(w, W[:, keep].reshape(4, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d, beta, atol=1e-6, rtol=1e-6)
    assert patch_error(st, keep, w, d) < 1e-10


def test_errors_equal_materialised_and_never_increase():
    X, W, Y = problem(1, c=6, k=4, n=3, noise=0.5)
    st = stats_of(X, Y, 6, 4)
    A, b = st.channel_problem(W)
    yy = float((Y**2).sum())
    previous = float("inf")
    for m in range(1, 7):
        keep = torch.arange(m)
        taps = torch.cat([torch.arange(4) + 4 * i for i in range(m)])
        # before re-fitting: original weights of the kept channels, no bias change
        direct = float(((Y - X[:, taps] @ W[:, :m].reshape(3, -1).T) ** 2).sum()) / yy
        assert channel_error(A, b, st.yy, keep) == pytest.approx(direct, rel=1e-9)
        w, d = lstsq(st, keep)
        fitted = float(((Y - X[:, taps] @ w.T - d) ** 2).sum()) / yy
        assert patch_error(st, keep, w, d) == pytest.approx(fitted, rel=1e-6, abs=1e-12)
        assert fitted <= previous + 1e-9
        previous = fitted
        s = scale(A, b, keep, ridge=0.0)
        Z = contributions(X, W)[:m].T.numpy()
        ref = np.linalg.lstsq(Z, Y.reshape(-1).numpy(), rcond=None)[0]
        np.testing.assert_allclose(s.numpy(), ref, rtol=1e-6, atol=1e-8)


def test_rank_deficient_gram_gives_finite_weights():
    X, W, Y = problem(2, c=4, k=4, n=3)
    X[:, 4:8] = X[:, 0:4]  # channel 1 duplicates channel 0
    X[:, 12:16] = 0  # channel 3 is dead
    st = stats_of(X, Y, 4, 4)
    w, d = lstsq(st, torch.arange(4))
    assert torch.isfinite(w).all() and torch.isfinite(d).all()
    A, b = st.channel_problem(W)
    for k in range(1, 5):
        assert len(lasso(A, b, k)) == k and len(thinet(A, b, k)) == k


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 1, 1), (5, 1, 2, 2), ((3, 1), (2, 1), (0, 1), 1)],
)
def test_patches_at_sampled_positions_equal_unfold(kernel, stride, padding, dilation):
    conv = torch.nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 11, 9)
    y = conv(x)
    ho, wo = y.shape[2:]
    pos = sample_positions(2, ho * wo, 7, seed=0, layer=1)
    ph, pw = conv.padding
    patches = gather_patches(
        x,
        pos,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=(pw, pw, ph, ph),
        dilation=conv.dilation,
        out_width=wo,
    )
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, ck, L)
    ref = torch.stack([cols[i, :, pos[i]].T for i in range(2)]).reshape(-1, cols.shape[1])
    torch.testing.assert_close(patches, ref)
    # the conv output at those positions is the patch times the flattened weight
    out = patches @ conv.weight.reshape(4, -1).T + conv.bias
    torch.testing.assert_close(out, gather_targets(y, pos), atol=1e-5, rtol=1e-5)


def test_positions_are_seeded_per_image_and_distinct():
    whole = sample_positions(6, 50, 10, seed=3, layer=7)
    split = torch.cat(
        [sample_positions(2, 50, 10, seed=3, layer=7, image_offset=i) for i in (0, 2, 4)]
    )
    assert torch.equal(whole, split)  # independent of batching
    assert all(len(set(row.tolist())) == 10 for row in whole)
    assert int(whole.min()) >= 0 and int(whole.max()) < 50
    assert not torch.equal(whole, sample_positions(6, 50, 10, seed=4, layer=7))
    assert torch.equal(sample_positions(2, 12, None, seed=0, layer=0)[1], torch.arange(12))
