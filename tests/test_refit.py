"""The cross-validated re-fit: per-fold statistics, held-out errors, the ridge's choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import recon
from recon.gather import _image_folds
from recon.report import LayerReport, Report
from recon.solve import RIDGE_GRID, cv_lstsq, kept_taps, lstsq, patch_error
from recon.stats import PatchStats


def problem(seed: int, N: int, c: int = 5, k: int = 4, n: int = 3, noise: float = 0.0):
    """Patches X (N, c*k), weights W (n, c, k), Y = X Wᵀ + 0.3 + noise, folds by 'image'."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c * k, generator=g, dtype=torch.float64) + 0.5
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    Y = X @ W.reshape(n, -1).T + 0.3 + noise * torch.randn(N, n, generator=g, dtype=torch.float64)
    return X, W, Y


def accumulate(X, Y, c, k, folds, fold_of_row) -> PatchStats:
    st = PatchStats(c, k, Y.shape[1], folds=folds)
    for xs, ys, fs in zip(X.split(7), Y.split(7), fold_of_row.split(7), strict=True):
        st.update(xs, ys, fs)
    return st


# --------------------------------------------------------------------------- fold sums


def test_fold_and_rest_equal_sums_of_materialised_rows():
    X, _, Y = problem(0, 50)
    fold = torch.arange(50) % 3
    st = accumulate(X, Y, 5, 4, 3, fold)
    assert st.count == 50
    for f in range(3):
        for part, rows in ((st.fold(f), fold == f), (st.rest(f), fold != f)):
            x, y = X[rows], Y[rows]
            torch.testing.assert_close(part.G, x.T @ x)
            torch.testing.assert_close(part.C, x.T @ y)
            torch.testing.assert_close(part.s, x.sum(0))
            torch.testing.assert_close(part.t, y.sum(0))
            torch.testing.assert_close(part.yy, (y * y).sum())
            assert part.count == int(rows.sum())
    torch.testing.assert_close(st.G, X.T @ X)  # totals over folds


def test_totals_follow_updates_and_merges():
    X, _, Y = problem(1, 40)
    fold = torch.arange(40) % 2
    a = accumulate(X[:20], Y[:20], 5, 4, 2, fold[:20])
    first = a.G.clone()
    b = accumulate(X[20:], Y[20:], 5, 4, 2, fold[20:])
    a.merge_(b)
    assert not torch.equal(a.G, first)  # the cached total was refreshed
    torch.testing.assert_close(a.G, X.T @ X)
    a.update(X[:1], Y[:1], 1)
    torch.testing.assert_close(a.G, X.T @ X + X[:1].T @ X[:1])


def test_bad_folds_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="'folds'"):
        PatchStats(2, 1, 1, folds=0)
    st = PatchStats(2, 1, 1, folds=2)
    with pytest.raises(ValueError, match=r"'fold'.*None"):
        st.update(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"'fold'.*0\.\.1.*2"):
        st.update(torch.zeros(3, 2), torch.zeros(3, 1), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="'other'"):
        st.merge_(PatchStats(2, 1, 1, folds=3))


def test_image_folds_are_seeded_and_independent_of_batching():
    whole = _image_folds(0, 100, 4, seed=0)
    parts = torch.cat([_image_folds(i, 10, 4, seed=0) for i in range(0, 100, 10)])
    assert torch.equal(whole, parts)
    assert set(whole.tolist()) == {0, 1, 2, 3}
    assert 10 <= int((whole == 0).sum()) <= 40  # a balanced-ish split
    assert not torch.equal(whole, _image_folds(0, 100, 4, seed=1))


# --------------------------------------------------------------------------- held-out errors


@pytest.mark.parametrize("max_outputs", [None, 2])
@pytest.mark.parametrize("center", ["scale", "original"])
@pytest.mark.parametrize("lam", [0.0, 0.1, 3.0, math.inf])
def test_heldout_error_equals_explicit_fits_on_materialised_folds(center, lam, max_outputs):
    c, k, n, N, K = 4, 3, 5, 60, 3
    X, W, Y = problem(2, N, c, k, n, noise=0.5)
    fold = torch.arange(N) % K
    st = accumulate(X, Y, c, k, K, fold)
    keep = torch.tensor([0, 2, 3])
    w0 = W * 0.7  # the consumer's current weights: not the truth
    fit = cv_lstsq(st, keep, w0, grid=(lam,), centers=(center,), max_outputs=max_outputs)
    outs = [0, 4] if max_outputs == 2 else list(range(n))  # evenly spaced outputs
    idx = kept_taps(keep, k)
    total = 0.0
    for f in range(K):
        tr, te = fold != f, fold == f
        x, y = X[tr][:, idx].numpy(), Y[tr].numpy()
        w_S = w0[:, keep].reshape(n, -1).numpy()
        if center == "scale":  # ThiNet's scale fit on the training rows, by channel
            Z = np.stack(
                [
                    x[:, j * k : (j + 1) * k] @ w_S[:, j * k : (j + 1) * k].T
                    for j in range(len(keep))
                ],
                -1,
            )  # (rows, n, m)
            A = np.einsum("ron,rom->nm", Z, Z)
            b = np.einsum("ron,ro->n", Z, y)
            s = np.linalg.solve(A + 1e-6 * np.trace(A) / len(keep) * np.eye(len(keep)), b)
            wc = w_S * np.repeat(s, k)[None]
        else:
            wc = w_S
        if math.isinf(lam):
            w = wc
        else:  # ridge towards wc with an unpenalised intercept, on centred rows
            xc, yc = x - x.mean(0), y - y.mean(0)
            Gc = xc.T @ xc
            unit = np.trace(Gc) / Gc.shape[0]
            lam_abs = lam * unit + 1e-6 * np.trace(x.T @ x) / len(idx) + 1e-12
            w = np.linalg.solve(Gc + lam_abs * np.eye(len(idx)), xc.T @ yc + lam_abs * wc.T).T
        beta = (y - x @ w.T).mean(0)
        pred = X[te][:, idx].numpy() @ w.T + beta
        total += float(((Y[te].numpy() - pred)[:, outs] ** 2).sum())
    expected = total / float((Y[:, outs] ** 2).sum())
    assert fit.heldout[(center, lam)] == pytest.approx(expected, rel=1e-6)
    assert fit.heldout_error == pytest.approx(expected, rel=1e-6)


def test_noiseless_overdetermined_data_choose_no_ridge_and_recover_exactly():
    c, k, n = 5, 4, 3
    X, W, Y = problem(3, 200, c, k, n)
    st = accumulate(X, Y, c, k, 4, torch.arange(200) % 4)
    fit = cv_lstsq(st, torch.arange(c), W * 0.5)  # the current weights are wrong by half
    assert fit.ridge == 0.0
    torch.testing.assert_close(fit.weight, W.reshape(n, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        fit.bias_delta, torch.full((n,), 0.3, dtype=torch.float64), rtol=0, atol=1e-6
    )
    assert fit.heldout_error < 1e-10


def test_underdetermined_noisy_data_choose_a_large_ridge_that_generalises():
    c, k, n = 6, 9, 4  # 54 unknowns per output
    X, W, Y = problem(4, 2000, c, k, n, noise=2.0)
    train, fresh_x, fresh_y = slice(0, 40), X[40:], Y[40:]  # 40 samples for 54 unknowns
    st = accumulate(X[train], Y[train], c, k, 4, torch.arange(40) % 4)
    keep = torch.arange(c)
    w0 = W + 0.1 * torch.randn(
        W.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )  # close to the truth, like a trained layer
    fit = cv_lstsq(st, keep, w0, grid=RIDGE_GRID)  # λ = 0 included, to compare with
    assert fit.ridge >= 1.0
    assert 0.0 not in {lam for _, lam in cv_lstsq(st, keep, w0).heldout}  # left out by default
    safe = min(fit.heldout[(c, math.inf)] for c in ("scale", "original"))
    assert fit.heldout_error <= safe
    assert fit.heldout_error < fit.heldout[("scale", 0.0)]
    # And on fresh samples of the same distribution, better than plain least squares.
    fresh = PatchStats(c, k, n)
    fresh.update(fresh_x, fresh_y)
    plain = lstsq(st, keep)
    assert patch_error(fresh, keep, fit.weight, fit.bias_delta) < patch_error(fresh, keep, *plain)


def test_one_fold_falls_back_to_plain_least_squares():
    c, k, n = 3, 2, 2
    X, W, Y = problem(5, 30, c, k, n, noise=0.1)
    st = accumulate(X, Y, c, k, 1, torch.zeros(30, dtype=torch.int64))
    fit = cv_lstsq(st, torch.arange(c), W)
    assert fit.ridge == 0.0 and math.isnan(fit.heldout_error) and fit.heldout == {}
    w, b = lstsq(st, torch.arange(c))
    # Equal up to the stabilising ridge (1e-6 of the mean diagonal), which pulls towards
    # the centre here and towards zero in lstsq().
    torch.testing.assert_close(fit.weight, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fit.bias_delta, b, rtol=1e-4, atol=1e-5)


def test_bad_grid_and_centers_are_refused():
    st = PatchStats(2, 1, 1, folds=2)
    with pytest.raises(ValueError, match="'centers'"):
        cv_lstsq(st, torch.arange(2), torch.ones(1, 2, 1), centers=("zero",))
    with pytest.raises(ValueError, match="'grid'"):
        cv_lstsq(st, torch.arange(2), torch.ones(1, 2, 1), grid=(-1.0,))


# --------------------------------------------------------------------------- through prune


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return recon.models.vgg11(width=0.125).eval()


def test_prune_reports_ridge_and_heldout_error():
    calib = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="under-determined: cross-validation chose"):
        res = recon.prune(_net(), calib, keep_ratio=0.5, progress=False)
    rows = res.report.layers
    assert all(r.ridge >= 0 for r in rows)
    assert all(r.heldout_error >= 0 for r in rows if not math.isnan(r.heldout_error))
    text = str(res.report)
    assert "held out" in text and "ridge" in text
    again = Report.from_json(res.report.to_json())
    assert again == res.report


def test_plain_lstsq_has_no_folds_and_matches_the_one_fold_fit():
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = recon.prune(_net(), calib, keep_ratio=0.5, reconstruct="lstsq_plain", progress=False)
    assert all(math.isnan(r.ridge) for r in plain.report.layers)
    cv = recon.prune(_net(), calib, keep_ratio=0.5, progress=False)
    first_plain, first_cv = plain.report.layers[0], cv.report.layers[0]
    assert cv.kept["features.0"] == plain.kept["features.0"]  # same inputs, same selection
    # Plain least squares is the best fit to the calibration samples; a ridge can only
    # lose there (what it buys is the held-out error).
    assert first_cv.error_after >= first_plain.error_after * (1 - 1e-9)
    if first_cv.ridge == 0:
        assert first_cv.error_after == pytest.approx(first_plain.error_after, rel=1e-4)


def test_layer_report_json_keeps_an_infinite_ridge():
    row = LayerReport(
        "a", "conv", 4, 2, "lasso", "lstsq", 0.1, 0.05, 1.0, ridge=math.inf, heldout_error=0.07
    )
    d = row.to_dict()
    assert d["ridge"] == "inf"
    assert LayerReport.from_dict(d) == row
    old = {k: v for k, v in d.items() if k not in ("ridge", "heldout_error")}
    assert math.isnan(LayerReport.from_dict(old).ridge)  # reports from before


def test_wide_layers_search_a_coarser_grid(monkeypatch):
    import recon.solve as solve

    c, k, n = 4, 3, 2
    X, W, Y = problem(6, 80, c, k, n, noise=0.3)
    st = accumulate(X, Y, c, k, 4, torch.arange(80) % 4)
    fine = {lam for _, lam in cv_lstsq(st, torch.arange(c), W).heldout}
    assert fine == set(solve.RIDGE_GRID)  # 12 kept taps, 60 training samples
    monkeypatch.setattr(solve, "CV_WIDE", 8)
    coarse = {lam for _, lam in cv_lstsq(st, torch.arange(c), W).heldout}
    assert coarse == set(solve.RIDGE_GRID_WIDE)


def test_few_samples_solve_in_the_range_of_the_gram_as_cholesky_would(monkeypatch):
    import recon.solve as solve

    c, k, n = 12, 9, 3  # 108 unknowns per output, 24 samples: the low-rank path
    X, W, Y = problem(7, 24, c, k, n, noise=0.5)
    st = accumulate(X, Y, c, k, 4, torch.arange(24) % 4)
    keep = torch.arange(c)
    calls = []
    low_rank = solve._fold_space
    monkeypatch.setattr(solve, "_fold_space", lambda *a: calls.append(1) or low_rank(*a))
    fast = cv_lstsq(st, keep, W)
    assert calls  # the range was used
    monkeypatch.setattr(solve, "FOLD_SPACE_FACTOR", 10**9)  # never: a Cholesky per λ
    monkeypatch.setattr(solve, "RANGE_FACTOR", 10**9)
    calls.clear()
    slow = cv_lstsq(st, keep, W)
    assert not calls
    assert fast.ridge == slow.ridge and fast.center == slow.center
    for key, err in slow.heldout.items():
        assert fast.heldout[key] == pytest.approx(err, rel=1e-6), key
    if not math.isinf(fast.ridge):
        torch.testing.assert_close(fast.weight, slow.weight, rtol=1e-6, atol=1e-8)


def test_kept_blocks_equal_the_mirrored_grams_in_any_order():
    X, _, Y = problem(8, 40)
    st = accumulate(X, Y, 5, 4, 2, torch.arange(40) % 2)
    idx = torch.tensor([7, 0, 19, 3, 12])  # not sorted
    blocks = st.kept_blocks(idx)  # from the stored lower triangles
    full = st.Gf  # mirrored
    torch.testing.assert_close(blocks, full[:, idx][:, :, idx], rtol=0, atol=0)
    assert torch.equal(blocks, blocks.transpose(1, 2))
