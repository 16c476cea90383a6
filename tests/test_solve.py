"""Least-squares re-fitting and error formulas against materialised samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon.lowrank import Gram
from recon.solve import (
    RECONSTRUCT,
    channel_error,
    cv_lstsq,
    kept_taps,
    lstsq,
    patch_error,
    scale,
)
from recon.stats import PatchStats


def linear_data(seed: int, N: int = 120, c: int = 5, k: int = 4, n: int = 3, noise: float = 0.0):
    """Patches X (N, c*k) (not centred), weights W (n, c, k), bias β (n,), Y = X Wᵀ + β + noise."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c * k, generator=g, dtype=torch.float64)
    X += torch.randn(1, c * k, generator=g, dtype=torch.float64)
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    beta = torch.randn(n, generator=g, dtype=torch.float64)
    Y = X @ W.reshape(n, -1).T + beta
    Y += noise * torch.randn(N, n, generator=g, dtype=torch.float64)
    return X, W, beta, Y


def stats_of(X, Y, c, k) -> PatchStats:
    st = PatchStats(c, k, Y.shape[1])
    for xb, yb in zip(X.split(37), Y.split(37), strict=True):
        st.update(xb, yb)
    return st


def taps_of(keep, k):
    return [i * k + p for i in keep for p in range(k)]


def rel_error(Y, pred) -> float:
    return float(((Y - pred) ** 2).sum() / (Y**2).sum())


def contributions(X, W):
    """Z (c, N*n): Z_i = X_i W_iᵀ for every sample and output."""
    _n, c, k = W.shape
    return torch.einsum("bck,nck->cbn", X.reshape(-1, c, k), W).reshape(c, -1)


# --- kept_taps ------------------------------------------------------------------------------


def test_kept_taps_known_answer():
    assert kept_taps(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert kept_taps(torch.tensor([1]), 1).tolist() == [1]
    assert kept_taps(torch.tensor([3, 1]), 2).tolist() == [6, 7, 2, 3]  # in the order given
    assert kept_taps(torch.tensor([], dtype=torch.int64), 9).numel() == 0


def test_kept_taps_selects_channel_blocks_of_conv_weight():
    W = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([1, 4, 5])
    flat = W.reshape(4, -1)[:, kept_taps(keep, 9)]
    assert torch.equal(flat, W[:, keep].reshape(4, -1))


# --- lstsq ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_lstsq_recovers_noiseless_weights_and_bias(seed):
    c, k, n = 5, 4, 3
    X, W, beta, Y = linear_data(seed, c=c, k=k, n=n)
    st = stats_of(X, Y, c, k)
    keep = torch.arange(c)
    w, d = lstsq(st, keep, ridge=0.0)
    assert w.shape == (n, c * k) and d.shape == (n,)
    assert w.dtype == d.dtype == torch.float64
    torch.testing.assert_close(w, W.reshape(n, -1), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(d, beta, rtol=1e-8, atol=1e-8)
    assert patch_error(st, keep, w, d) < 1e-14
    # the default ridge is small: still close
    w, d = lstsq(st, keep)
    torch.testing.assert_close(w, W.reshape(n, -1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d, beta, rtol=1e-4, atol=1e-4)
    assert patch_error(st, keep, w, d) < 1e-8


@pytest.mark.parametrize("keep", [[0, 2, 4], [3], [1, 2, 3, 4]])
def test_lstsq_exact_on_subset_the_truth_uses(keep):
    c, k, n = 5, 9, 4
    X, W, beta, _ = linear_data(1, N=150, c=c, k=k, n=n)
    dropped = [i for i in range(c) if i not in keep]
    W[:, dropped] = 0  # the true map reads only the kept channels
    Y = X @ W.reshape(n, -1).T + beta
    st = stats_of(X, Y, c, k)
    w, d = lstsq(st, torch.tensor(keep), ridge=0.0)
    assert w.shape == (n, len(keep) * k)
    torch.testing.assert_close(w, W[:, keep].reshape(n, -1), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(d, beta, rtol=1e-8, atol=1e-8)
    assert patch_error(st, torch.tensor(keep), w, d) < 1e-14


@pytest.mark.parametrize("fit_bias", [True, False])
def test_lstsq_equals_numpy_lstsq_on_materialised_samples(fit_bias):
    c, k, n = 6, 4, 3
    X, _W, _beta, Y = linear_data(2, c=c, k=k, n=n, noise=0.7)
    st = stats_of(X, Y, c, k)
    keep = [0, 3, 5]
    design = X[:, taps_of(keep, k)].numpy()
    if fit_bias:
        design = np.hstack([design, np.ones((design.shape[0], 1))])
    ref = np.linalg.lstsq(design, Y.numpy(), rcond=None)[0]  # (m*k [+1], n)
    w, d = lstsq(st, torch.tensor(keep), fit_bias=fit_bias, ridge=0.0)
    np.testing.assert_allclose(w.numpy(), ref[: len(keep) * k].T, rtol=1e-7, atol=1e-9)
    if fit_bias:
        np.testing.assert_allclose(d.numpy(), ref[-1], rtol=1e-7, atol=1e-9)
    else:
        assert d is None


def test_lstsq_with_bias_never_worse_than_without():
    c, k, n = 4, 4, 3
    X, _W, _beta, Y = linear_data(3, c=c, k=k, n=n, noise=1.0)
    st = stats_of(X, Y, c, k)
    keep = torch.tensor([1, 2])
    w, d = lstsq(st, keep)
    w0, _ = lstsq(st, keep, fit_bias=False)
    assert patch_error(st, keep, w, d) <= patch_error(st, keep, w0) + 1e-12


def test_lstsq_is_a_minimum():
    c, k, n = 4, 4, 2
    X, _W, _beta, Y = linear_data(4, c=c, k=k, n=n, noise=0.5)
    st = stats_of(X, Y, c, k)
    keep = torch.tensor([0, 1, 3])
    w, d = lstsq(st, keep, ridge=0.0)
    best = patch_error(st, keep, w, d)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        dw = 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        dd = 1e-3 * torch.randn(d.shape, generator=g, dtype=torch.float64)
        assert patch_error(st, keep, w + dw, d) > best
        assert patch_error(st, keep, w, d + dd) > best


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_errors_equal_materialised_before_and_after(seed):
    c, k, n = 6, 4, 3
    X, W, _beta, Y = linear_data(seed, c=c, k=k, n=n, noise=0.5)
    st = stats_of(X, Y, c, k)
    A, b = st.channel_problem(W)
    for keep in ([0], [1, 4], [0, 2, 3, 5], list(range(6))):
        idx = torch.tensor(keep)
        taps = taps_of(keep, k)
        w_orig = W[:, keep].reshape(n, -1)
        # before re-fitting: the kept channels with their original weights, bias unchanged
        before = rel_error(Y, X[:, taps] @ w_orig.T)
        assert channel_error(A, b, st.yy, idx) == pytest.approx(before, rel=1e-9)
        assert channel_error(A, b, float(st.yy), idx) == pytest.approx(before, rel=1e-9)
        assert patch_error(st, idx, w_orig) == pytest.approx(before, rel=1e-9)
        assert patch_error(st, idx, W[:, keep]) == pytest.approx(before, rel=1e-9)  # 3-D
        # after re-fitting
        w, d = lstsq(st, idx)
        after = rel_error(Y, X[:, taps] @ w.T + d)
        assert patch_error(st, idx, w, d) == pytest.approx(after, rel=1e-7, abs=1e-12)
        assert after <= before + 1e-12
        # after ThiNet scaling
        s = scale(A, b, idx)
        scaled = rel_error(Y, X[:, taps] @ (w_orig * s.repeat_interleave(k)).T)
        assert channel_error(A, b, st.yy, idx, s) == pytest.approx(scaled, rel=1e-7, abs=1e-12)
        assert scaled <= before + 1e-12


def test_patch_error_with_arbitrary_bias_and_conv_shaped_weight():
    c, kh, kw, n = 3, 3, 3, 4
    k = kh * kw
    X, _W, _beta, Y = linear_data(5, c=c, k=k, n=n, noise=0.3)
    st = stats_of(X, Y, c, k)
    g = torch.Generator().manual_seed(1)
    keep = [0, 2]
    w = torch.randn(n, len(keep), kh, kw, generator=g, dtype=torch.float64)
    d = torch.randn(n, generator=g, dtype=torch.float64)
    direct = rel_error(Y, X[:, taps_of(keep, k)] @ w.reshape(n, -1).T + d)
    assert patch_error(st, torch.tensor(keep), w, d) == pytest.approx(direct, rel=1e-9)
    assert patch_error(st, torch.tensor(keep), w.float(), d.float()) == pytest.approx(
        rel_error(Y, X[:, taps_of(keep, k)] @ w.float().double().reshape(n, -1).T + d.float()),
        rel=1e-6,
    )


def test_error_of_zero_targets_is_zero():
    c, k, n = 2, 1, 2
    X = torch.randn(10, c * k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = stats_of(X, torch.zeros(10, n, dtype=torch.float64), c, k)
    keep = torch.arange(c)
    w, d = lstsq(st, keep)
    assert torch.isfinite(w).all() and torch.isfinite(d).all()
    assert patch_error(st, keep, w, d) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_error_never_increases_with_more_channels(seed):
    c, k, n = 7, 4, 3
    X, _W, _beta, Y = linear_data(seed, c=c, k=k, n=n, noise=1.0)
    st = stats_of(X, Y, c, k)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(c, generator=g)
    A, b = st.channel_problem(_W)
    previous = previous_scaled = float("inf")
    for m in range(1, c + 1):
        keep = order[:m].sort().values  # nested subsets
        w, d = lstsq(st, keep)
        err = patch_error(st, keep, w, d)
        assert err <= previous + 1e-9
        previous = err
        scaled = channel_error(A, b, st.yy, keep, scale(A, b, keep))
        assert scaled <= previous_scaled + 1e-9
        previous_scaled = scaled


# --- scale ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_scale_equals_numpy_lstsq_on_contributions(seed):
    c, k, n = 6, 4, 3
    X, W, _beta, Y = linear_data(seed, c=c, k=k, n=n, noise=0.8)
    st = stats_of(X, Y, c, k)
    A, b = st.channel_problem(W)
    Z = contributions(X, W)  # (c, N*n)
    for keep in ([2], [0, 5], [1, 2, 3, 4], list(range(6))):
        ref = np.linalg.lstsq(Z[keep].T.numpy(), Y.reshape(-1).numpy(), rcond=None)[0]
        s = scale(A, b, torch.tensor(keep), ridge=0.0)
        assert s.shape == (len(keep),) and s.dtype == torch.float64
        np.testing.assert_allclose(s.numpy(), ref, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(scale(A, b, torch.tensor(keep)).numpy(), ref, rtol=1e-4)


def test_scale_is_one_when_channels_already_fit():
    c, k, n = 4, 4, 2
    X, W, _beta, _ = linear_data(0, c=c, k=k, n=n)
    Y = X @ W.reshape(n, -1).T
    st = stats_of(X, Y, c, k)
    A, b = st.channel_problem(W)
    s = scale(A, b, torch.arange(c), ridge=0.0)
    torch.testing.assert_close(s, torch.ones(c, dtype=torch.float64), rtol=1e-8, atol=1e-8)
    assert channel_error(A, b, st.yy, torch.arange(c)) < 1e-14


# --- rank-deficient statistics --------------------------------------------------------------


@pytest.mark.parametrize("ridge", [0.0, 1e-6])
@pytest.mark.parametrize("fit_bias", [True, False])
def test_rank_deficient_gram_gives_finite_optimal_weights(ridge, fit_bias):
    c, k, n = 5, 4, 3
    X, W, _beta, Y = linear_data(6, c=c, k=k, n=n, noise=0.5)
    X[:, 4:8] = X[:, 0:4]  # channel 1 duplicates channel 0
    X[:, 12:16] = 0  # channel 3 is dead
    X[:, 16:20] = 1.0  # channel 4 is constant: collinear with the intercept
    st = stats_of(X, Y, c, k)
    keep = torch.arange(c)
    w, d = lstsq(st, keep, fit_bias=fit_bias, ridge=ridge)
    assert torch.isfinite(w).all()
    assert d is None or torch.isfinite(d).all()
    torch.testing.assert_close(w[:, 12:16], torch.zeros(n, 4, dtype=torch.float64))
    pred = X @ w.T + (d if fit_bias else 0)
    design = X.numpy() if not fit_bias else np.hstack([X.numpy(), np.ones((X.shape[0], 1))])
    ref = np.linalg.lstsq(design, Y.numpy(), rcond=None)[0]
    optimum = rel_error(Y, torch.from_numpy(design @ ref))
    assert rel_error(Y, pred) == pytest.approx(optimum, rel=1e-5, abs=1e-10)
    assert patch_error(st, keep, w, d) == pytest.approx(rel_error(Y, pred), rel=1e-6, abs=1e-10)
    A, b = st.channel_problem(W)
    s = scale(A, b, keep, ridge=ridge)
    assert torch.isfinite(s).all()
    assert float(s[3]) == 0.0  # a dead channel gets no weight


def test_all_zero_inputs_give_finite_weights():
    c, k, n = 3, 2, 2
    X = torch.zeros(20, c * k, dtype=torch.float64)
    Y = torch.randn(20, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = stats_of(X, Y, c, k)
    w, d = lstsq(st, torch.arange(c))
    assert torch.isfinite(w).all() and torch.isfinite(d).all()
    torch.testing.assert_close(d, Y.mean(0))  # only the intercept can fit
    A, b = st.channel_problem(torch.ones(n, c, k))
    assert torch.isfinite(scale(A, b, torch.arange(c))).all()


def test_reconstruct_modes_listed():
    assert set(RECONSTRUCT) == {"lstsq", "lstsq_plain", "scale", "none"}


# --- cross-validated re-fit in the span of the samples ---------------------------------------


def cv_stats(seed: int, N: int, c: int, k: int, n: int, folds: int = 4, empty: int | None = None):
    """Patches X (N, c*k) with an offset, Y = X Wᵀ + 0.3 + noise, folds by sample; the
    consumer's current weights (not the truth)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c * k, generator=g, dtype=torch.float64) + 0.5
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    Y = X @ W.reshape(n, -1).T + 0.3 + 0.5 * torch.randn(N, n, generator=g, dtype=torch.float64)
    fold = torch.arange(N) % folds
    if empty is not None:
        fold[fold == empty] = (empty + 1) % folds
    st = PatchStats(c, k, n, folds=folds)
    for xs, ys, fs in zip(X.split(7), Y.split(7), fold.split(7), strict=True):
        st.update(xs, ys, fs)
    w0 = W + 0.3 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    return st, w0


def dense_cv(monkeypatch, *args, **kwargs):
    """cv_lstsq with a Cholesky factorisation per fold and ridge (the path for many samples)."""
    import recon.solve as solve

    with monkeypatch.context() as m:
        m.setattr(solve, "FOLD_SPACE_FACTOR", 10**9)
        m.setattr(solve, "RANGE_FACTOR", 10**9)
        return cv_lstsq(*args, **kwargs)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("N", "c", "k", "n", "kwargs"),
    [
        (24, 12, 9, 5, {}),  # 108 unknowns, 24 samples
        (40, 12, 9, 40, {"max_outputs": None}),
        (30, 20, 4, 3, {"grid": (0.01, 0.5, 2.0, math.inf), "centers": ("original",)}),
        (36, 16, 9, 6, {"empty": 2}),  # a fold without samples
    ],
)
def test_cv_in_the_span_of_the_samples_equals_the_dense_solve(
    monkeypatch, seed, N, c, k, n, kwargs
):
    import recon.solve as solve

    kwargs = dict(kwargs)
    st, w0 = cv_stats(seed, N, c, k, n, empty=kwargs.pop("empty", None))
    keep = torch.arange(c)[torch.arange(c) % 5 != 1]  # not every channel
    calls = []
    space = solve._fold_space
    monkeypatch.setattr(solve, "_fold_space", lambda *a: calls.append(space(*a)) or calls[-1])
    fast = cv_lstsq(st, keep, w0, **kwargs)
    assert calls and calls[0] is not None  # the span was used
    slow = dense_cv(monkeypatch, st, keep, w0, **kwargs)
    assert (fast.center, fast.ridge) == (slow.center, slow.ridge)
    assert fast.heldout.keys() == slow.heldout.keys()
    for key, err in slow.heldout.items():
        assert fast.heldout[key] == pytest.approx(err, rel=1e-7), key
    torch.testing.assert_close(fast.weight, slow.weight, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(fast.bias_delta, slow.bias_delta, rtol=1e-7, atol=1e-9)


def test_cv_with_many_samples_stays_dense(monkeypatch):
    import recon.solve as solve

    st, w0 = cv_stats(0, 200, 4, 9, 3)  # 36 unknowns, 200 samples
    calls = []
    monkeypatch.setattr(solve, "_fold_space", lambda *a: calls.append(1))
    fit = cv_lstsq(st, torch.arange(4), w0)
    assert not calls and fit.ridge in solve.RIDGE_GRID


def test_cv_span_falls_back_where_the_grams_are_not_of_low_rank(monkeypatch):
    """Noise above the ridge's scale in every direction (a float32-rounded Gram): no low-rank
    factor within tolerance, and the dense solve is used."""
    import recon.solve as solve

    st, w0 = cv_stats(1, 24, 12, 9, 4)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(st.Gf.shape, generator=g, dtype=torch.float64)
    noise = noise @ noise.transpose(1, 2) * 1e-3  # positive semidefinite, full rank
    st.Gf = st.Gf + noise
    st._totals.clear()
    keep = torch.arange(12)
    assert solve._fold_space(
        [Gram.of(G) for G in st.Gf], st.sf, st.nf, st.Gf.diagonal(dim1=1, dim2=2).sum(1),
        solve._Sums(None, st.C, st.s, st.t, st.yy_out, float(st.count)), 0.1,
    ) is None  # fmt: skip
    fit = cv_lstsq(st, keep, w0)
    slow = dense_cv(monkeypatch, st, keep, w0)
    assert (fit.center, fit.ridge) == (slow.center, slow.ridge)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N", [24, 400])
def test_cv_lstsq_on_cuda_equals_cpu(N):
    st, w0 = cv_stats(2, N, 12, 9, 6)
    keep = torch.arange(0, 12, 2)
    cpu = cv_lstsq(st, keep, w0)
    on_gpu = PatchStats(12, 9, 6, device="cuda", folds=4)
    on_gpu.merge_(st)
    gpu = cv_lstsq(on_gpu, keep.cuda(), w0.cuda())
    assert (gpu.center, gpu.ridge) == (cpu.center, cpu.ridge)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("center", ["scale", "original"])
@pytest.mark.parametrize("lam", [0.05, 2.0, math.inf])
def test_cv_in_the_span_equals_explicit_fits_on_materialised_folds(monkeypatch, center, lam):
    """Under-determined (30 samples, 54 unknowns): the held-out error of the fit in the span
    of the samples equals explicit ridge fits on the materialised training folds."""
    import recon.solve as solve

    c, k, n, N, K = 6, 9, 3, 30, 3
    g = torch.Generator().manual_seed(5)
    X = torch.randn(N, c * k, generator=g, dtype=torch.float64) + 0.5
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    Y = X @ W.reshape(n, -1).T + 0.3 + 0.5 * torch.randn(N, n, generator=g, dtype=torch.float64)
    fold = torch.arange(N) % K
    st = PatchStats(c, k, n, folds=K)
    st.update(X, Y, fold)
    keep, w0 = torch.arange(c), 0.7 * W
    calls = []
    space = solve._fold_space
    monkeypatch.setattr(solve, "_fold_space", lambda *a: calls.append(space(*a)) or calls[-1])
    fit = cv_lstsq(st, keep, w0, grid=(lam,), centers=(center,), max_outputs=None)
    assert math.isinf(lam) or (calls and calls[0] is not None)  # inf: nothing to solve
    total = 0.0
    for f in range(K):
        tr, te = fold != f, fold == f
        x, y = X[tr].numpy(), Y[tr].numpy()
        w_S = w0.reshape(n, -1).numpy()
        if center == "scale":  # ThiNet's scale fit on the training rows, by channel
            Z = np.stack([x[:, j * k : (j + 1) * k] @ w_S[:, j * k : (j + 1) * k].T
                          for j in range(c)], -1)  # fmt: skip
            A = np.einsum("ron,rom->nm", Z, Z)
            b = np.einsum("ron,ro->n", Z, y)
            s = np.linalg.solve(A + 1e-6 * np.trace(A) / c * np.eye(c), b)
            wc = w_S * np.repeat(s, k)[None]
        else:
            wc = w_S
        if math.isinf(lam):
            w = wc
        else:
            xc, yc = x - x.mean(0), y - y.mean(0)
            unit = np.trace(xc.T @ xc) / (c * k)
            lam_abs = lam * unit + 1e-6 * np.trace(x.T @ x) / (c * k) + 1e-12
            w = np.linalg.solve(xc.T @ xc + lam_abs * np.eye(c * k), xc.T @ yc + lam_abs * wc.T).T
        beta = (y - x @ w.T).mean(0)
        total += float(((Y[te].numpy() - X[te].numpy() @ w.T - beta) ** 2).sum())
    assert fit.heldout[(center, lam)] == pytest.approx(total / float((Y**2).sum()), rel=1e-7)


def test_cv_in_the_span_with_one_sample_per_fold_is_finite():
    """Training folds of one sample: the centred Gram is zero (its unit of ridge too)."""
    g = torch.Generator().manual_seed(6)
    X = torch.randn(2, 40, generator=g, dtype=torch.float64)
    Y = torch.randn(2, 3, generator=g, dtype=torch.float64)
    st = PatchStats(10, 4, 3, folds=4)
    st.update(X, Y, torch.tensor([1, 2]))
    fit = cv_lstsq(st, torch.arange(10), torch.randn(3, 10, 4, generator=g, dtype=torch.float64))
    assert torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias_delta).all()
    assert all(math.isfinite(v) for v in fit.heldout.values())


@pytest.mark.parametrize(("N", "dense"), [(24, False), (24, True), (400, True)])
def test_cv_fit_reports_the_errors_patch_error_gives(monkeypatch, N, dense):
    """CVFit.error and error_given are patch_error's of the fit and of the given weights,
    from the factors of the folds' Grams (N < unknowns) or from the whole Gram; and the
    error of the given weights is channel_error's of the whole channel problem."""
    st, w0 = cv_stats(3, N, 12, 9, 6)
    keep = torch.arange(0, 12, 2)
    fit = dense_cv(monkeypatch, st, keep, w0) if dense else cv_lstsq(st, keep, w0)
    assert fit.error == pytest.approx(
        patch_error(st, keep, fit.weight, fit.bias_delta), rel=1e-9, abs=1e-12
    )
    w_S = w0[:, keep].reshape(6, -1)
    assert fit.error_given == pytest.approx(patch_error(st, keep, w_S), rel=1e-9)
    A, b = st.channel_problem(w0)
    assert fit.error_given == pytest.approx(channel_error(A, b, st.yy, keep), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_scale_sums_from_the_fold_factors_equal_those_of_the_blocks(seed):
    """The per-fold channel problems of the scale centre, from the folds' low-rank factors
    (no (m·k)² blocks), equal those of the gathered blocks."""
    import recon.solve as solve

    st, w0 = cv_stats(seed, 24, 12, 9, 6)
    keep = torch.tensor([1, 2, 5, 7, 8, 11])
    idx = solve.kept_taps(keep, 9)
    grams = [solve._kept_rows(st, f, idx) for f in range(4)]
    traces = torch.stack([g.diag.sum() for g in grams])
    Cf, sf = st.Cf[:, idx], st.sf[:, idx]
    whole = solve._Sums(None, Cf.sum(0), sf.sum(0), st.t, st.yy_out, float(st.count))
    space = solve._fold_space(grams, sf, st.nf, traces, whole, 0.1)
    assert space is not None
    w_S = w0[:, keep].reshape(6, -1)
    A, b = space.scale_sums(Cf, w_S, 9)
    A0, b0 = solve._scale_sums(st.kept_blocks(idx), Cf, w_S, 9)
    scale = float(A0.abs().max())
    torch.testing.assert_close(A, A0, rtol=1e-9, atol=1e-11 * scale)
    torch.testing.assert_close(b, b0, rtol=1e-12, atol=0)
