"""Greedy removal on the re-fitted least-squares error (``method="obs"``), known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import recon
from recon.obs import removal_order, removal_order_shared
from recon.select import obs, obs_order, obs_shared, select_channels
from recon.solve import lstsq, patch_error
from recon.stats import PatchStats


def patches(seed: int = 0, N: int = 300, c: int = 6, taps: int = 3, n: int = 4):
    """Samples ``X`` (N, c*taps) with channel 3 a near copy of channel 0, and ``Y``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c * taps, generator=g, dtype=torch.float64)
    X[:, 3 * taps : 4 * taps] = 0.9 * X[:, :taps] + 0.05 * torch.randn(N, taps, generator=g)
    W = torch.randn(c * taps, n, generator=g, dtype=torch.float64)
    Y = X @ W + 0.3 * torch.randn(N, n, generator=g, dtype=torch.float64) + 2.0
    return X, Y


def refit_error(X, Y, kept, taps) -> float:
    """``min_{W,β} ‖Y − X_S W − β‖²`` by an explicit least-squares solve."""
    cols = [i * taps + j for i in kept for j in range(taps)]
    design = torch.cat([X[:, cols], torch.ones(len(X), 1, dtype=X.dtype)], 1)
    fit = torch.linalg.lstsq(design, Y).solution
    return float(((Y - design @ fit) ** 2).sum())


def stats_of(X, Y, taps) -> PatchStats:
    st = PatchStats(channels=X.shape[1] // taps, taps=taps, outputs=Y.shape[1])
    st.update(X, Y)
    return st


def test_each_removal_is_the_brute_force_greedy_choice_and_its_cost():
    X, Y, taps = *patches(), 3
    order, increase = removal_order(
        X.T @ X, X.T @ Y, taps, s=X.sum(0), t=Y.sum(0), count=len(X), ridge=0.0
    )
    alive = list(range(6))
    for g, rise in zip(order.tolist(), increase.tolist(), strict=True):
        now = refit_error(X, Y, alive, taps)
        costs = {h: refit_error(X, Y, [a for a in alive if a != h], taps) - now for h in alive}
        assert g == min(costs, key=costs.get)
        assert rise == pytest.approx(costs[g], rel=1e-8, abs=1e-8)
        alive.remove(g)
    assert order[0] in (0, 3)  # one of the near copies goes first, almost for free
    assert increase[0] < 0.01 * increase[1:].min()


def test_without_intercept_it_is_the_greedy_on_plain_least_squares():
    X, Y = patches(seed=1, taps=1, c=5)
    order, increase = removal_order(X.T @ X, X.T @ Y, 1, ridge=0.0)

    def err(kept):
        fit = torch.linalg.lstsq(X[:, kept], Y).solution
        return float(((Y - X[:, kept] @ fit) ** 2).sum())

    alive = list(range(5))
    for g, rise in zip(order.tolist(), increase.tolist(), strict=True):
        costs = {h: err([a for a in alive if a != h]) - err(alive) for h in alive}
        assert g == min(costs, key=costs.get)
        assert rise == pytest.approx(costs[g], rel=1e-8)
        alive.remove(g)


def test_obs_keeps_the_best_set_and_its_order_is_nested():
    X, Y, taps = *patches(seed=2), 3
    st = stats_of(X, Y, taps)
    order = obs_order(st)
    assert sorted(order.tolist()) == list(range(6))
    for k in range(1, 7):
        kept = obs(st, k)
        assert kept.tolist() == sorted(order[:k].tolist())
        assert select_channels("obs", k, stats=st).tolist() == kept.tolist()
    # With one channel to remove the greedy choice is the optimum: the re-fitted error
    # of its set is the smallest of the six, as lstsq's own fit measures it.
    kept = obs(st, 5)
    errors = {
        h: patch_error(st, torch.tensor(s), *lstsq(st, torch.tensor(s), ridge=0.0))
        for h in range(6)
        for s in [[a for a in range(6) if a != h]]
    }
    assert kept.tolist() == [a for a in range(6) if a != min(errors, key=errors.get)]


def test_obs_beats_lasso_and_thinet_on_the_re_fitted_error():
    """Channels whose original weights reconstruct badly but whose re-fit does well."""
    X, Y, taps = *patches(seed=3, c=8), 3
    st = stats_of(X, Y, taps)
    w = torch.randn(4, 8, taps, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A, b = st.channel_problem(w)  # a consumer weight unrelated to Y: a poor proxy
    for k in (2, 4, 6):
        kept = {m: select_channels(m, k, A=A, b=b, stats=st) for m in ("obs", "lasso", "thinet")}
        err = {m: patch_error(st, s, *lstsq(st, s)) for m, s in kept.items()}
        assert err["obs"] <= min(err["lasso"], err["thinet"]) + 1e-12


def test_obs_without_patch_statistics_uses_the_channel_problem():
    g = torch.Generator().manual_seed(4)
    Z = torch.randn(5, 40, generator=g, dtype=torch.float64)
    y = Z[:3].sum(0) + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    A, b = Z @ Z.T, Z @ y
    kept = obs(None, 3, A=A, b=b)
    assert kept.tolist() == [0, 1, 2]  # y is made of them; the scale re-fit recovers it
    assert obs_order(None, A=A, b=b)[:3].sort().values.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "'stats'"),
        ({"A": torch.eye(3)}, "'stats'"),
    ],
)
def test_obs_needs_statistics(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_channels("obs", 2, **kwargs)


def test_removal_order_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="taps=2"):
        removal_order(torch.eye(5), torch.zeros(5, 1), 2)
    with pytest.raises(ValueError, match="'steps'"):
        removal_order(torch.eye(4), torch.zeros(4, 1), 2, steps=2)


def test_prune_with_obs_finds_channels_the_others_make_redundant():
    """Producer channels 8..15 are large linear combinations of 0..3 (no activation
    between): 8 channels spanning the 16 (4..7 among them) reproduce the output exactly
    after the re-fit, which greedy removal on the re-fitted error finds; LASSO's and
    ThiNet's proxy (each channel with its own weights, scaled) keeps the large ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():
        mix = 5 * torch.randn(8, 8)
        mix[:, 4:] = 0
        w = net[0].weight
        w[8:] = torch.einsum("ij,jckl->ickl", mix, w[:8])
        net[0].bias[8:] = mix @ net[0].bias[:8]
    x, held = torch.randn(32, 3, 10, 10), torch.randn(16, 3, 10, 10)
    with torch.no_grad():
        ref = net(held)
    err = {}
    for method in ("obs", "lasso", "thinet"):
        res = recon.prune(
            net, x.split(16), method=method, reconstruct="lstsq_plain", keep_ratio=0.5,
            samples_per_image=None, progress=False,
        )  # fmt: skip
        assert res.model[0].out_channels == 8 and res.model[1].in_channels == 8
        with torch.no_grad():
            err[method] = float((res.model(held) - ref).pow(2).sum() / ref.pow(2).sum())
    assert err["obs"] < 1e-6
    assert err["lasso"] > 1e-4 and err["thinet"] > 1e-4


def _problem(X, Y, taps) -> dict:
    return {"G": X.T @ X, "C": X.T @ Y, "taps": taps, "s": X.sum(0), "t": Y.sum(0), "count": len(X)}


def test_shared_removal_with_one_consumer_is_plain_removal():
    X, Y = patches(seed=3)
    order, _ = removal_order(**_problem(X, Y, 3))
    assert torch.equal(removal_order_shared([_problem(X, Y, 3)], [1.0]), order)


def test_shared_removal_is_the_brute_force_greedy_choice_on_the_weighted_sum():
    # Two consumers read the same 6 channels (different patches and targets); each step
    # removes the channel whose removal raises w1·E1 + w2·E2 least, each re-fitted.
    (X1, Y1), (X2, Y2) = patches(seed=1, taps=3), patches(seed=2, taps=1)
    weights = [1.0 / float((Y1**2).sum()), 3.0 / float((Y2**2).sum())]
    got = removal_order_shared([_problem(X1, Y1, 3), _problem(X2, Y2, 1)], weights)
    kept = list(range(6))
    for g in got.tolist():

        def total(S):
            return weights[0] * refit_error(X1, Y1, S, 3) + weights[1] * refit_error(X2, Y2, S, 1)

        best = min(kept, key=lambda c: total([k for k in kept if k != c]))
        assert g == best
        kept.remove(g)
    assert torch.equal(
        obs_shared([stats_of(X1, Y1, 3), stats_of(X2, Y2, 1)], weights, 2),
        torch.tensor(sorted([*kept, got[-1].item()])),  # the survivor and the last removed
    )


# --------------------------------------------------------------------------- wide problems


def wide(seed: int = 0, N: int = 12, c: int = 16, taps: int = 3, n: int = 40):
    """Fewer samples (N) than patch entries (c*taps) and than outputs (n): the centred
    Gram has rank N - 1, and the greedy works on a factor of it."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c * taps, generator=g, dtype=torch.float64) + 0.3
    W = torch.randn(c * taps, n, generator=g, dtype=torch.float64)
    return X, X @ W + 0.1 * torch.randn(N, n, generator=g, dtype=torch.float64)


def ridge_error(X, Y, kept, taps, eps) -> float:
    """``min ‖Y − X_S W − β‖² + ε‖W‖²`` on materialised samples (β free), explicitly."""
    cols = [i * taps + j for i in kept for j in range(taps)]
    Xc, Yc = X[:, cols] - X[:, cols].mean(0), Y - Y.mean(0)
    W = torch.linalg.solve(Xc.T @ Xc + eps * torch.eye(len(cols), dtype=X.dtype), Xc.T @ Yc)
    return float(((Yc - Xc @ W) ** 2).sum() + eps * (W**2).sum())


def modes(monkeypatch, mode: str) -> None:
    """Force one of the three forms of the greedy's state."""
    import recon.obs as obs_module

    if mode == "dense":
        monkeypatch.setattr(obs_module, "LOW_RANK_FACTOR", 1e9)
    else:
        monkeypatch.setattr(obs_module, "LOW_RANK_FACTOR", 1.0)
        monkeypatch.setattr(obs_module, "LOW_RANK_UPDATES", 1.0 if mode == "factor" else 1e9)


@pytest.mark.parametrize("mode", ["dense", "factor", "inverse from factor"])
@pytest.mark.parametrize("seed", range(3))
def test_wide_removal_is_the_brute_force_greedy_choice(monkeypatch, mode, seed):
    """With fewer samples than unknowns every form of the state makes the brute-force
    greedy choice on the ridge-regularised error (the ridge decides among fits that all
    interpolate), with its cost."""
    modes(monkeypatch, mode)
    X, Y = wide(seed)
    taps, c = 3, 16
    Xc = X - X.mean(0)
    eps = 1e-3 * float((Xc**2).sum()) / X.shape[1] + 1e-12
    order, increase = removal_order(**_problem(X, Y, taps), ridge=1e-3)
    alive = list(range(c))
    for g, rise in zip(order.tolist(), increase.tolist(), strict=True):
        now = ridge_error(X, Y, alive, taps, eps)
        costs = {h: ridge_error(X, Y, [a for a in alive if a != h], taps, eps) - now for h in alive}
        best = min(costs, key=costs.get)
        assert g == best or costs[g] <= costs[best] * (1 + 1e-9) + 1e-12
        assert rise == pytest.approx(costs[g], rel=1e-6, abs=1e-9 * float((Y**2).sum()))
        alive.remove(g)


@pytest.mark.parametrize("seed", range(4))
def test_the_factor_forms_give_the_dense_order_and_increases(monkeypatch, seed):
    X, Y = wide(seed, N=20, c=24, taps=4, n=48)
    results = {}
    for mode in ("dense", "factor", "inverse from factor"):
        modes(monkeypatch, mode)
        results[mode] = removal_order(**_problem(X, Y, 4))
    order, increase = results["dense"]
    for mode in ("factor", "inverse from factor"):
        assert torch.equal(results[mode][0], order), mode
        torch.testing.assert_close(results[mode][1], increase, rtol=1e-6, atol=1e-12)


def test_factor_form_is_used_for_few_samples_and_not_for_many(monkeypatch):
    import recon.obs as obs_module

    X, Y = wide(0, N=10, c=24, taps=4, n=30)
    assert isinstance(obs_module._state(**_problem(X, Y, 4)), obs_module._LowRank)
    X, Y = wide(0, N=200, c=24, taps=4, n=30)
    assert isinstance(obs_module._state(**_problem(X, Y, 4)), obs_module._Greedy)
    # a Gram of full rank (rounding noise above the ridge's scale): the dense form
    X, Y = wide(0, N=10, c=24, taps=4, n=30)
    problem = _problem(X, Y, 4)
    noise = torch.randn(96, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    problem["G"] = problem["G"] + 1e-3 * noise @ noise.T
    assert isinstance(obs_module._state(**problem), obs_module._Greedy)
    # no intercept (no sample count): the dense form
    X, Y = wide(0, N=10, c=24, taps=4, n=30)
    assert isinstance(obs_module._state(X.T @ X, X.T @ Y, 4), obs_module._Greedy)


def test_outputs_are_compressed_to_the_rank_of_the_cross_term(monkeypatch):
    """More outputs than samples: the greedy runs on ``B̃`` with ``B̃B̃ᵀ = BBᵀ`` and as
    many columns as ``B``'s rank, and chooses as with every output."""
    import recon.obs as obs_module

    X, Y = wide(1, N=10, c=16, taps=3, n=40)
    B = (X - X.mean(0)).T @ (Y - Y.mean(0))
    small = obs_module._compress_outputs(B)
    assert small.shape == (48, 9)  # rank N - 1 of the centred samples
    scale = float(B.norm()) ** 2
    torch.testing.assert_close(small @ small.T, B @ B.T, rtol=1e-9, atol=1e-9 * scale)
    order, increase = removal_order(**_problem(X, Y, 3))
    monkeypatch.setattr(obs_module, "_compress_outputs", lambda B: B)
    full_order, full_increase = removal_order(**_problem(X, Y, 3))
    assert torch.equal(order, full_order)
    torch.testing.assert_close(increase, full_increase, rtol=1e-7, atol=1e-12)


def test_shared_removal_mixes_the_forms():
    """A wide consumer (factor form) and a narrow one (dense form) read the same channels."""
    (X1, Y1), (X2, Y2) = wide(2, N=10, c=12, taps=3, n=20), patches(seed=4, c=12, taps=1)
    weights = [1.0 / float((Y1**2).sum()), 1.0 / float((Y2**2).sum())]
    got = removal_order_shared([_problem(X1, Y1, 3), _problem(X2, Y2, 1)], weights)
    survivor = set(range(12)).difference(got.tolist()).pop()
    assert sorted([*got.tolist(), survivor]) == list(range(12))
    import recon.obs as obs_module

    states = [obs_module._state(**_problem(X1, Y1, 3)), obs_module._state(**_problem(X2, Y2, 1))]
    assert isinstance(states[0], obs_module._LowRank) and isinstance(states[1], obs_module._Greedy)
    for g in got.tolist():  # each step: the least weighted sum of the forms' own costs
        cost = weights[0] * states[0].costs() + weights[1] * states[1].costs()
        assert g == int(torch.argmin(cost))
        states = [st.remove(g) for st in states]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N", [10, 300])
def test_removal_order_on_cuda_equals_cpu(N):
    X, Y = wide(3, N=N, c=16, taps=3, n=24)
    order, increase = removal_order(**_problem(X, Y, 3))
    problem = _problem(X, Y, 3)
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in problem.items()}
    got, got_increase = removal_order(**on_gpu)
    assert torch.equal(got, order)
    torch.testing.assert_close(got_increase, increase, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("folds", [1, 4])
@pytest.mark.parametrize(
    ("N", "mode"), [(12, "factor"), (12, "inverse from factor"), (200, "dense")]
)
def test_statistics_read_by_rows_give_the_order_of_their_summed_gram(monkeypatch, folds, N, mode):
    """obs reads a fold-kept Gram by rows (:meth:`PatchStats.gram`, no whole sum) where
    its factor form needs only some rows: the same order and increases as from the total
    ``G``, with fewer samples than patch entries and with many."""
    modes(monkeypatch, mode)
    X, Y = wide(5, N=N, c=16, taps=3, n=40)
    st = PatchStats(16, 3, 40, folds=folds)
    st.update(X, Y, torch.arange(N) % folds)
    kw = {"taps": 3, "s": st.s, "t": st.t, "count": st.count}
    rows_order, rows_rise = removal_order(st.gram(), st.C, **kw)
    order, rise = removal_order(st.G.clone(), st.C, **kw)
    assert torch.equal(rows_order, order)
    torch.testing.assert_close(rows_rise, rise, rtol=1e-9, atol=1e-12 * float(st.yy))
