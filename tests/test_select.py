"""Channel selection on synthetic channel problems with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.linear_model import Lasso

import recon.select
from recon.select import (
    METHODS,
    by_score,
    channel_order,
    first_k,
    lasso,
    lasso_coef,
    lasso_order,
    lasso_path,
    random,
    score_order,
    select_channels,
    thinet,
    thinet_order,
)


def materialised(seed: int, c: int = 8, N: int = 60, n: int = 4, k: int = 3, noise: float = 0.5):
    """Contributions Z (c, N*n) of a random linear consumer and targets y (N*n,).

    Column ``i`` of the design ``Z.T`` is channel ``i``'s contribution ``X_i W_iᵀ`` to every
    output of every sample; ``y`` is the full output plus noise.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c, k, generator=g, dtype=torch.float64)
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    W *= torch.rand(1, c, 1, generator=g, dtype=torch.float64) + 0.1  # unequal channels
    Z = torch.einsum("bck,nck->cbn", X, W).reshape(c, -1)
    y = Z.sum(0) + noise * torch.randn(N * n, generator=g, dtype=torch.float64)
    return Z, y


def problem(Z, y):
    return Z @ Z.T, Z @ y


def removal_error(Z, kept) -> float:
    removed = [i for i in range(Z.shape[0]) if i not in set(kept)]
    return float(Z[removed].sum(0).pow(2).sum()) if removed else 0.0


def assert_valid(kept, c, k):
    assert isinstance(kept, torch.Tensor)
    assert kept.dtype == torch.int64
    assert kept.shape == (k,)
    values = kept.tolist()
    assert values == sorted(set(values))
    assert all(0 <= v < c for v in values)


# --- LASSO --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.02, 0.1, 0.5, 2.0])
def test_lasso_coef_equals_sklearn_lasso(seed, alpha):
    Z, y = materialised(seed)
    design, target = Z.T.numpy(), y.numpy()
    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    ref.fit(design, target)
    A, b = problem(Z, y)
    beta = lasso_coef(A, b, alpha * len(target))
    assert beta.shape == (8,)
    np.testing.assert_array_equal(np.flatnonzero(beta.numpy()), np.flatnonzero(ref.coef_))
    np.testing.assert_allclose(beta.numpy(), ref.coef_, atol=1e-6)


def test_lasso_coef_is_zero_above_max_correlation_and_ols_at_zero():
    Z, y = materialised(0, noise=0.1)
    A, b = problem(Z, y)
    lam_max = float(b.abs().max())
    assert not lasso_coef(A, b, lam_max * 1.01).any()
    ols = np.linalg.lstsq(Z.T.numpy(), y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(lasso_coef(A, b, 0.0).numpy(), ols, rtol=1e-6, atol=1e-8)


def test_lasso_one_dimensional_known_answer():
    # ½ a β² − bβ + λ|β|  ->  β = (b − λ) / a for b > λ
    A = torch.tensor([[4.0]], dtype=torch.float64)
    b = torch.tensor([10.0], dtype=torch.float64)
    assert float(lasso_coef(A, b, 2.0)[0]) == pytest.approx(2.0)
    assert float(lasso_coef(A, b, 12.0)[0]) == 0.0


def test_lasso_path_starts_at_zero_and_decreases():
    Z, y = materialised(1)
    A, b = problem(Z, y)
    alphas, coefs = lasso_path(A, b)
    assert coefs.shape == (8, len(alphas))
    assert np.all(np.diff(alphas) <= 0)
    assert alphas[0] == pytest.approx(float(b.abs().max()))
    assert not coefs[:, 0].any()


@pytest.mark.parametrize("seed", range(3))
def test_lasso_kept_set_is_a_sklearn_support(seed):
    # for every k, the kept set is the support of sklearn's Lasso at a λ inside the
    # path segment where exactly k channels are active
    Z, y = materialised(seed, c=6)
    design, target = Z.T.numpy(), y.numpy()
    A, b = problem(Z, y)
    alphas, coefs = lasso_path(A, b)
    nnz = (coefs != 0).sum(0)
    for k in range(1, 6):
        kept = lasso(A, b, k)
        assert_valid(kept, 6, k)
        i = int(np.flatnonzero(nnz == k)[0])
        lam = 0.5 * (alphas[i - 1] + alphas[i])  # active set of column i holds on (α_i, α_{i-1})
        ref = Lasso(alpha=lam / len(target), fit_intercept=False, tol=1e-12, max_iter=100_000)
        ref.fit(design, target)
        assert np.flatnonzero(ref.coef_).tolist() == kept.tolist()


def test_lasso_recovers_planted_channels():
    g = torch.Generator().manual_seed(0)
    c, N, n, k = 8, 80, 4, 3
    X = torch.randn(N, c, k, generator=g, dtype=torch.float64)
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    Z = torch.einsum("bck,nck->cbn", X, W).reshape(c, -1)
    planted = [1, 4, 6]
    y = Z[planted].sum(0)  # Y made from 3 of 8 channels
    A, b = problem(Z, y)
    assert lasso(A, b, 3).tolist() == planted


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("c", [1, 2, 5, 9])
def test_lasso_returns_exactly_k_for_every_k(seed, c):
    Z, y = materialised(seed, c=c)
    A, b = problem(Z, y)
    for k in range(1, c + 1):
        assert_valid(lasso(A, b, k), c, k)
    assert lasso(A, b, c).tolist() == list(range(c))


@pytest.mark.parametrize("case", ["zero", "duplicate", "both", "all_zero", "scaled_copy"])
def test_lasso_exactly_k_on_degenerate_channels(case):
    Z, y = materialised(2, c=6)
    if case in ("zero", "both"):
        Z[[1, 4]] = 0
    if case in ("duplicate", "both"):
        Z[3] = Z[0]
        Z[5] = Z[2]
    if case == "all_zero":
        Z[:] = 0
    if case == "scaled_copy":
        Z[5] = -2 * Z[0]
    A, b = problem(Z, y)
    for k in range(1, 7):
        kept = lasso(A, b, k)
        assert_valid(kept, 6, k)
        if case in ("zero", "both") and k <= 4:
            assert not {1, 4} & set(kept.tolist()), "a dead channel kept before a live one"


# --- LASSO by coordinate descent -----------------------------------------------------------


def degenerate(case: str):
    """The channel problem of ``materialised(2, c=6)`` with dead, duplicate or scaled channels."""
    Z, y = materialised(2, c=6)
    if case in ("zero", "both"):
        Z[[1, 4]] = 0
    if case in ("duplicate", "both"):
        Z[3] = Z[0]
        Z[5] = Z[2]
    if case == "all_zero":
        Z[:] = 0
    if case == "scaled_copy":
        Z[5] = -2 * Z[0]
    return problem(Z, y)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("c", [6, 20, 40])
def test_lasso_cd_returns_k_and_mostly_agrees_with_lars(seed, c):
    Z, y = materialised(seed, c=c)
    A, b = problem(Z, y)
    agree = 0
    for k in range(1, c + 1):
        kept = lasso(A, b, k, solver="cd")
        assert_valid(kept, c, k)
        agree += kept.tolist() == lasso(A, b, k, solver="lars").tolist()
    assert agree >= 0.9 * c  # they differ only where the path has several k-active segments


def planted_problem():
    """Y made from channels 1, 4, 6 of 8 exactly: the LASSO path never has more than 3 active."""
    g = torch.Generator().manual_seed(0)
    c, N, n, k = 8, 80, 4, 3
    X = torch.randn(N, c, k, generator=g, dtype=torch.float64)
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    Z = torch.einsum("bck,nck->cbn", X, W).reshape(c, -1)
    return problem(Z, Z[[1, 4, 6]].sum(0))


def test_lasso_cd_recovers_planted_channels_and_equals_lars():
    A, b = planted_problem()
    assert lasso(A, b, 3, solver="cd").tolist() == [1, 4, 6]
    for k in (1, 2, 3, 8):
        assert lasso(A, b, k, solver="cd").tolist() == lasso(A, b, k, solver="lars").tolist()


@pytest.mark.parametrize("k", [4, 5])
def test_lasso_cd_ranks_never_entered_channels_by_score(k):
    A, b = planted_problem()
    score = (b.abs() / A.diagonal().sqrt()).numpy()
    expected = sorted(np.argsort(-score, kind="stable")[:k].tolist())
    assert lasso(A, b, k, solver="lars").tolist() == expected  # the documented rule
    assert lasso(A, b, k, solver="cd").tolist() == expected


@pytest.mark.parametrize("seed", range(3))
def test_lasso_cd_kept_set_is_a_sklearn_support(seed):
    # as test_lasso_kept_set_is_a_sklearn_support, for the bisection solver
    Z, y = materialised(seed, c=6)
    design, target = Z.T.numpy(), y.numpy()
    A, b = problem(Z, y)
    alphas, coefs = lasso_path(A, b)
    nnz = (coefs != 0).sum(0)
    for k in range(1, 6):
        kept = lasso(A, b, k, solver="cd")
        i = int(np.flatnonzero(nnz == k)[0])
        lam = 0.5 * (alphas[i - 1] + alphas[i])
        ref = Lasso(alpha=lam / len(target), fit_intercept=False, tol=1e-12, max_iter=100_000)
        ref.fit(design, target)
        assert np.flatnonzero(ref.coef_).tolist() == kept.tolist()


@pytest.mark.parametrize("case", ["zero", "duplicate", "both", "all_zero", "scaled_copy"])
def test_lasso_cd_exactly_k_on_degenerate_channels(case):
    A, b = degenerate(case)
    for k in range(1, 7):
        kept = lasso(A, b, k, solver="cd")
        assert_valid(kept, 6, k)
        if case in ("zero", "both") and k <= 4:
            assert not {1, 4} & set(kept.tolist()), "a dead channel kept before a live one"
    if case == "all_zero":  # nothing to go by: the first k, as LARS does
        assert lasso(A, b, 3, solver="cd").tolist() == [0, 1, 2]


def test_lasso_cd_walk_down_is_bounded_when_k_exceeds_the_live_channels(monkeypatch):
    alphas = []

    class CountingLasso(Lasso):
        def fit(self, X, y, **kwargs):
            alphas.append(self.alpha)
            return super().fit(X, y, **kwargs)

    monkeypatch.setattr(recon.select, "Lasso", CountingLasso)
    A, b = degenerate("zero")  # 4 live channels, k = 5
    assert_valid(lasso(A, b, 5, solver="cd"), 6, 5)
    assert min(alphas) > 0
    assert len(alphas) <= 13 + recon.select._BISECTION_STEPS


def test_lasso_unknown_solver_raises_naming_solver():
    A, b = problem(*materialised(0, c=4))
    for solver in ("newton", "LARS", None):
        with pytest.raises(ValueError, match="'solver'"):
            lasso(A, b, 2, solver=solver)
    with pytest.raises(ValueError, match="'solver'"):
        lasso(A, b, 4, solver="bogus")  # checked before the k == c shortcut


def test_lasso_auto_solver_switches_at_lars_max_channels(monkeypatch):
    A, b = problem(*materialised(1, c=6))
    calls = []
    for name in ("_lasso_lars", "_lasso_cd"):
        impl = getattr(recon.select, name)
        monkeypatch.setattr(
            recon.select, name, lambda *a, _f=impl, _n=name: calls.append(_n) or _f(*a)
        )
    assert recon.select.LARS_MAX_CHANNELS >= 6
    for k in range(1, 6):
        assert lasso(A, b, k).tolist() == lasso(A, b, k, solver="lars").tolist()
    assert set(calls) == {"_lasso_lars"}
    calls.clear()
    monkeypatch.setattr(recon.select, "LARS_MAX_CHANNELS", 2)
    for k in range(1, 6):
        assert lasso(A, b, k).tolist() == lasso(A, b, k, solver="cd").tolist()
    assert set(calls) == {"_lasso_cd"}


# --- ThiNet ---------------------------------------------------------------------------------


def greedy_materialised(Z: torch.Tensor, k: int) -> list[int]:
    """ThiNet's greedy removal, every candidate's ‖Σ_{T ∪ {j}} Z‖² evaluated explicitly."""
    c = Z.shape[0]
    removed: list[int] = []
    while len(removed) < c - k:
        cands = [j for j in range(c) if j not in removed]
        costs = [float(Z[[*removed, j]].sum(0).pow(2).sum()) for j in cands]
        removed.append(cands[int(np.argmin(costs))])
    return sorted(set(range(c)) - set(removed))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [2, 4, 6, 8])
def test_thinet_equals_materialised_greedy(seed, c):
    Z, y = materialised(seed, c=c)
    A, b = problem(Z, y)
    for k in range(1, c + 1):
        kept = thinet(A, b, k)
        assert_valid(kept, c, k)
        assert kept.tolist() == greedy_materialised(Z, k)
        assert thinet(A, None, k).tolist() == kept.tolist()  # b is not used


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [3, 6, 8])
def test_thinet_versus_exhaustive(seed, c):
    Z, _ = materialised(seed, c=c)
    A = Z @ Z.T
    for k in range(1, c + 1):
        kept = thinet(A, None, k).tolist()
        err = removal_error(Z, kept)
        subsets = list(itertools.combinations(range(c), k))
        errors = [removal_error(Z, s) for s in subsets]
        best = min(errors)
        assert err >= best - 1e-9 * max(best, 1.0)  # greedy never beats exhaustive search
        if k == c - 1:  # one removal: greedy is the exhaustive optimum
            assert kept == list(subsets[int(np.argmin(errors))])
        if k == c:
            assert err == 0.0


def test_thinet_known_answer():
    # channels 0 and 1 nearly cancel each other, channel 2 is large
    Z = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, -1.0], [0.0, 5.0, 5.0]], dtype=torch.float64)
    A = Z @ Z.T  # diag (5, 6, 50), A_01 = -5
    assert thinet(A, None, 2).tolist() == [1, 2]  # first removal: channel 0, the cheapest
    assert thinet(A, None, 1).tolist() == [2]  # then channel 1 costs 2(-5) + 6 = -4 < 70


# --- baselines ------------------------------------------------------------------------------


def test_by_score_keeps_largest_scores_ties_to_lower_index():
    scores = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0, 0.0])
    assert by_score(scores, 1).tolist() == [1]
    assert by_score(scores, 2).tolist() == [1, 3]
    assert by_score(scores, 3).tolist() == [1, 3, 4]
    assert by_score(scores, 6).tolist() == list(range(6))
    assert by_score(torch.ones(5), 2).tolist() == [0, 1]


def test_first_k():
    for k in range(1, 6):
        assert first_k(5, k).tolist() == list(range(k))


def test_random_seeded_reproducible_and_seed_dependent():
    draws = {seed: random(30, 10, seed).tolist() for seed in range(5)}
    for seed, kept in draws.items():
        assert random(30, 10, seed).tolist() == kept
        assert_valid(random(30, 10, seed), 30, 10)
    assert len({tuple(v) for v in draws.values()}) == 5  # different seeds differ
    torch.manual_seed(0)
    a = random(30, 10, 7)
    torch.manual_seed(1)  # the global generator plays no part
    assert torch.equal(a, random(30, 10, 7))


def test_select_channels_dispatches():
    Z, y = materialised(0, c=6)
    A, b = problem(Z, y)
    scores = torch.tensor([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])
    assert torch.equal(select_channels("lasso", 3, A=A, b=b), lasso(A, b, 3))
    assert torch.equal(select_channels("thinet", 3, A=A, b=b), thinet(A, b, 3))
    assert select_channels("l1", 3, scores=scores).tolist() == [3, 4, 5]
    assert select_channels("max_response", 2, scores=scores).tolist() == [3, 4]
    assert select_channels("first_k", 2, width=6).tolist() == [0, 1]
    assert torch.equal(select_channels("random", 4, width=6, seed=3), random(6, 4, 3))
    with pytest.raises(ValueError, match="'method'"):
        select_channels("magnitude", 2, width=6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("c", [1, 4, 7])
def test_every_method_returns_exactly_k(method, c):
    Z, y = materialised(3, c=c)
    A, b = problem(Z, y)
    scores = torch.linspace(-1, 1, c)
    for k in range(1, c + 1):
        kept = select_channels(method, k, A=A, b=b, scores=scores, width=c, seed=1)
        assert_valid(kept, c, k)


BAD_K = [0, -1, 7, 2.5, True, "3", None, np.float64(2.0)]


@pytest.mark.parametrize("k", BAD_K)
@pytest.mark.parametrize("method", METHODS)
def test_bad_k_raises_naming_k(method, k):
    Z, y = materialised(0, c=6)
    A, b = problem(Z, y)
    with pytest.raises(ValueError, match="'k'"):
        select_channels(method, k, A=A, b=b, scores=torch.arange(6.0), width=6)


def test_numpy_integer_k_is_accepted():
    Z, y = materialised(0, c=6)
    A, b = problem(Z, y)
    assert_valid(lasso(A, b, np.int64(2)), 6, 2)
    assert_valid(thinet(A, b, np.int32(4)), 6, 4)


# --- property -------------------------------------------------------------------------------


@st.composite
def channel_problems(draw):
    """A PSD channel problem from small integer contributions (collinear and dead channels
    are common), and a ``k``."""
    c = draw(st.integers(1, 7))
    m = draw(st.integers(1, 6))
    Z = draw(arrays(np.float64, (c, m), elements=st.integers(-3, 3).map(float)))
    y = draw(arrays(np.float64, (m,), elements=st.integers(-3, 3).map(float)))
    k = draw(st.integers(1, c))
    Z, y = torch.from_numpy(Z), torch.from_numpy(y)
    return Z @ Z.T, Z @ y, k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=channel_problems(), seed=st.integers(0, 2**31 - 1))
def test_property_every_method_returns_k_sorted_unique_in_range(problem, seed):
    A, b, k = problem
    c = A.shape[0]
    scores = A.diagonal().clone()
    for method in METHODS:
        kept = select_channels(method, k, A=A, b=b, scores=scores, width=c, seed=seed)
        assert_valid(kept, c, k)


# --- nested orders --------------------------------------------------------------------------


def assert_permutation(order, c):
    assert isinstance(order, torch.Tensor)
    assert order.dtype == torch.int64
    assert sorted(order.tolist()) == list(range(c))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [1, 2, 6, 13])
def test_thinet_order_prefixes_are_thinet_selections(seed, c):
    Z, y = materialised(seed, c=c)
    A, b = problem(Z, y)
    order = thinet_order(A)
    assert_permutation(order, c)
    for k in range(1, c + 1):
        assert sorted(order[:k].tolist()) == thinet(A, b, k).tolist()


@pytest.mark.parametrize("case", ["zero", "duplicate", "both", "all_zero", "scaled_copy"])
def test_orders_nested_on_degenerate_channels(case):
    A, b = degenerate(case)
    for order, select in ((thinet_order(A), thinet), (lasso_order(A, b), lasso)):
        assert_permutation(order, 6)
        for k in range(1, 7):
            assert sorted(order[:k].tolist()) == select(A, b, k).tolist()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("c", [6, 12, 30])
@pytest.mark.parametrize("noise", [0.1, 2.0])
def test_lasso_order_prefixes_are_lasso_selections(seed, c, noise):
    # holds for every k on these problems (no channel leaves the path before the point
    # with k active); where one leaves, lasso(k) is the set at the first point with k
    Z, y = materialised(seed, c=c, N=max(60, 3 * c), noise=noise)
    A, b = problem(Z, y)
    order = lasso_order(A, b)
    assert_permutation(order, c)
    for k in range(1, c + 1):
        assert sorted(order[:k].tolist()) == lasso(A, b, k, solver="lars").tolist()


def test_lasso_order_is_the_order_of_entry_then_the_fallback_score():
    A, b = planted_problem()  # only channels 1, 4, 6 ever enter
    _, coefs = lasso_path(A, b)
    entry = [int(np.flatnonzero(coefs[i])[0]) for i in (1, 4, 6)]
    entered = [i for _, i in sorted(zip(entry, (1, 4, 6), strict=True))]
    score = (b.abs() / A.diagonal().sqrt()).numpy()
    rest = [i for i in np.argsort(-score, kind="stable").tolist() if i not in (1, 4, 6)]
    assert lasso_order(A, b).tolist() == entered + rest
    short = lasso_order(A, b, max_active=1)  # one step: one channel entered
    assert short[0] == entered[0]
    assert_permutation(short, 8)


def test_score_first_k_and_random_orders_nest_their_selections():
    scores = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0, 0.0])
    assert score_order(scores).tolist() == [1, 3, 4, 0, 5, 2]
    for k in range(1, 7):
        assert sorted(score_order(scores)[:k].tolist()) == by_score(scores, k).tolist()
        assert channel_order("first_k", width=6)[:k].tolist() == first_k(6, k).tolist()
        order = channel_order("random", width=6, seed=3)
        assert sorted(order[:k].tolist()) == random(6, k, 3).tolist()
    assert_permutation(channel_order("random", width=30, seed=1), 30)


def test_channel_order_dispatches():
    A, b = problem(*materialised(0, c=6))
    scores = torch.tensor([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])
    assert torch.equal(channel_order("thinet", A=A, b=b), thinet_order(A))
    assert torch.equal(channel_order("lasso", A=A, b=b), lasso_order(A, b))
    assert channel_order("l1", scores=scores).tolist() == [3, 4, 5, 0, 2, 1]
    assert channel_order("max_response", scores=scores).tolist() == [3, 4, 5, 0, 2, 1]


@pytest.mark.parametrize(
    ("method", "kwargs", "name"),
    [
        ("lasso", {}, "'A'"),
        ("lasso", {"A": torch.eye(3)}, "'b'"),
        ("thinet", {}, "'A'"),
        ("l1", {}, "'scores'"),
        ("max_response", {"scores": torch.ones(2, 2)}, "'scores'"),
        ("first_k", {}, "'width'"),
        ("random", {"width": 0}, "'width'"),
        ("magnitude", {"width": 3}, "'method'"),
        ("thinet", {"A": torch.ones(2, 3)}, "'A'"),
        ("lasso", {"A": torch.eye(3), "b": torch.ones(2)}, "'b'"),
    ],
)
def test_channel_order_bad_arguments_name_the_argument(method, kwargs, name):
    with pytest.raises(ValueError, match=name):
        channel_order(method, **kwargs)


def test_lasso_order_bad_max_active():
    A, b = problem(*materialised(0, c=4))
    with pytest.raises(ValueError, match="'max_active'"):
        lasso_order(A, b, max_active=0)
    with pytest.raises(TypeError, match="'max_active'"):
        lasso_order(A, b, max_active=2.0)
