"""Data-driven allocation: error curves along nested orders, and the global solve."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from recon.allocate import (
    Allocation,
    _FlopsModel,
    allocate,
    cost_at,
    count_grid,
    lstsq_error_curve,
    scale_error_curve,
)
from recon.budget import BudgetUnit, predict_flops
from recon.select import channel_order, lasso_order, thinet_order
from recon.solve import channel_error, lstsq, patch_error, scale
from recon.stats import PatchStats

# --- problems ---------------------------------------------------------------------------


def channel_problem(seed: int, c: int = 8, N: int = 60, n: int = 4, k: int = 3, noise: float = 0.3):
    """``A``, ``b``, ``‖Y‖²`` of a random consumer: ``Y`` the summed contributions plus noise."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c, k, generator=g, dtype=torch.float64)
    W = torch.randn(n, c, k, generator=g, dtype=torch.float64)
    W *= torch.rand(1, c, 1, generator=g, dtype=torch.float64) + 0.1  # unequal channels
    Z = torch.einsum("bck,nck->cbn", X, W).reshape(c, -1)  # (c, N*n) contributions
    y = Z.sum(0) + noise * torch.randn(N * n, generator=g, dtype=torch.float64)
    return Z @ Z.T, Z @ y, y @ y


def patch_stats(seed: int, c: int = 6, taps: int = 4, n: int = 5, N: int = 200, dup: bool = False):
    """Statistics of a random consumer ``Y = X Wᵀ + bias``. With ``dup``, input channels
    ``c/2 ..`` copy ``0 ..`` (a producer with duplicated filters) and are read with the
    same weights, so their contributions are copies too."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, c, taps, generator=g, dtype=torch.float64)
    W = torch.randn(n, c, taps, generator=g, dtype=torch.float64)
    if dup:
        X[:, c // 2 :] = X[:, : c // 2]
        W[:, c // 2 :] = W[:, : c // 2]
    Y = X.reshape(N, -1) @ W.reshape(n, -1).T + torch.randn(n, generator=g, dtype=torch.float64)
    stats = PatchStats(c, taps, n)
    stats.update(X.reshape(N, -1), Y)
    return stats, W


def chain_units(widths):
    """A VGG-like chain: unit ``i`` produces in ``conv{i}`` and is read by ``conv{i+1}``."""
    return [BudgetUnit(f"u{i}", w, (f"conv{i}",), (f"conv{i + 1}",)) for i, w in enumerate(widths)]


def forest_units(widths):
    """Residual-like blocks of two units: a sampler (read by ``b.conv1``) and ``b.conv1``."""
    units = []
    for i, w in enumerate(widths):
        block = f"b{i // 2}"
        if i % 2 == 0:
            units.append(BudgetUnit(f"u{i}", w, (), (f"{block}.conv1",)))
        else:
            units.append(BudgetUnit(f"u{i}", w, (f"{block}.conv1",), (f"{block}.conv2",)))
    return units


def tree_units(widths, rng):
    """A random tree: unit ``i > 0`` produces in a module that an earlier unit reads."""
    ins: list[list[str]] = [[] for _ in widths]
    outs: list[tuple[str, ...]] = [("stem",)]
    for i in range(1, len(widths)):
        j = int(rng.integers(0, i))
        ins[j].append(f"m{i}")
        outs.append((f"m{i}",))
    return [BudgetUnit(f"u{i}", w, outs[i], (*ins[i], f"leaf{i}")) for i, w in enumerate(widths)]


def random_problem(seed: int, shape: str, round_to: int = 1, kind: str = "smooth"):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 5))
    widths = [int(w) for w in rng.integers(2, 7, n)]
    if shape == "chain":
        units = chain_units(widths)
    elif shape == "forest":
        units = forest_units(widths)
    else:
        units = tree_units(widths, rng)
        units = [units[i] for i in rng.permutation(n)]  # any unit may be the DP's root
    modules = sorted({m for u in units for m in (*u.out_modules, *u.in_modules)})
    flops = {m: int(rng.integers(10, 200)) for m in modules}
    total = sum(flops.values()) + int(rng.integers(0, 50))
    curves = {}
    for u in units:
        counts = count_grid(u.width, round_to).numpy()
        if kind == "smooth":  # like an error curve times a sensitivity
            cost = rng.uniform(0.1, 5) * (1 - counts / u.width) ** rng.uniform(0.5, 3)
        else:
            cost = rng.random(len(counts))
        curves[u.name] = (counts.tolist(), cost.tolist())
    smallest = {u.name: curves[u.name][0][0] for u in units}
    most = total / predict_flops(units, smallest, flops, total)
    return units, curves, flops, total, 1 + float(rng.uniform(0.1, 0.95)) * (most - 1)


def brute_force(units, curves, flops, total, speedup, *, ignored=(), rtol=0.02):
    """Every combination: within the target, the least distance below the band, then cost."""
    target = total / speedup
    free = [u.name for u in units if u.name not in ignored]
    best = None
    for combo in itertools.product(*(range(len(curves[n][0])) for n in free)):
        channels = {n: curves[n][0][i] for n, i in zip(free, combo, strict=True)}
        f = predict_flops(units, channels, flops, total)
        if f > target * (1 + 1e-12):
            continue
        key = (
            max((1 - rtol) * target - f, 0.0),
            sum(curves[n][1][i] for n, i in zip(free, combo, strict=True)),
        )
        if best is None or key < best[0]:
            best = (key, channels, f)
    return best


def assert_matches_brute_force(alloc, units, curves, flops, total, speedup, ignored=()):
    (under, cost), _, _ = brute_force(units, curves, flops, total, speedup, ignored=ignored)
    target = total / speedup
    assert alloc.flops <= target * (1 + 1e-9)
    assert max(0.98 * target - alloc.flops, 0.0) == pytest.approx(under, abs=1e-9 * target)
    assert alloc.cost == pytest.approx(cost, rel=1e-12, abs=1e-12)


# --- count grid -----------------------------------------------------------------------------


def test_count_grid():
    assert count_grid(10).tolist() == list(range(1, 11))
    assert count_grid(10, 4).tolist() == [4, 8, 10]
    assert count_grid(8, 4).tolist() == [4, 8]
    assert count_grid(3, 8).tolist() == [3]
    grid = count_grid(512, 8, max_counts=10)
    assert len(grid) == 10 and grid[0] == 8 and grid[-1] == 512
    assert all(k % 8 == 0 for k in grid.tolist())
    assert count_grid(5, max_counts=10).tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"width": 0}, ValueError, "'width'"),
        ({"width": 4, "round_to": 0}, ValueError, "'round_to'"),
        ({"width": 4.0}, TypeError, "'width'"),
        ({"width": 4, "round_to": True}, TypeError, "'round_to'"),
        ({"width": 4, "max_counts": 1}, ValueError, "'max_counts'"),
    ],
)
def test_count_grid_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        count_grid(**kwargs)


# --- error curves ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("method", ["thinet", "lasso", "first_k"])
def test_scale_error_curve_equals_the_scale_refit(seed, method):
    A, b, yy = channel_problem(seed)
    order = channel_order(method, A=A, b=b, width=8)
    curve = scale_error_curve(A, b, yy, order)
    exact = scale_error_curve(A, b, yy, order, ridge=0.0)
    assert curve.shape == (8,) and curve.dtype == torch.float64
    for k in range(1, 9):
        keep = order[:k]
        expected = channel_error(A, b, yy, keep, scale(A, b, keep))
        # both carry a ridge of 1e-6 of the mean diagonal, not the same one
        assert float(curve[k - 1]) == pytest.approx(expected, abs=1e-5)
        assert float(exact[k - 1]) <= expected + 1e-12  # the unridged optimum is no worse
    assert (curve.diff() <= 0).all()
    subset = scale_error_curve(A, b, yy, order, [2, 5, 8])
    torch.testing.assert_close(subset, curve[[1, 4, 7]])


def test_scale_error_curve_exact_data_and_duplicates():
    # exact data (Y is the sum of the contributions), channels 4..7 copies of 0..3
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(4, 50, generator=g, dtype=torch.float64)
    Z = torch.cat([Z, Z])
    y = Z.sum(0)
    A, b, yy = Z @ Z.T, Z @ y, y @ y
    curve = scale_error_curve(A, b, yy, lasso_order(A, b))
    assert (curve.diff() <= 0).all()
    # LASSO takes one channel of each pair: half of them, scaled by 2, explain Y (up to the
    # ridge's 1e-6)
    assert float(curve[3]) < 1e-5
    assert float(curve[2]) > 1e-2
    # ThiNet's greedy ignores the re-fit: it removes from both copies and needs 5 channels
    curve = scale_error_curve(A, b, yy, thinet_order(A))
    assert float(curve[3]) > 0.1 > 1e-5 > float(curve[4])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fit_bias", [True, False])
def test_lstsq_error_curve_equals_the_lstsq_refit(seed, fit_bias):
    stats, W = patch_stats(seed)
    A, b = stats.channel_problem(W)
    order = channel_order("thinet", A=A, b=b)
    curve = lstsq_error_curve(stats, order, fit_bias=fit_bias)
    exact = lstsq_error_curve(stats, order, fit_bias=fit_bias, ridge=0.0)
    assert curve.shape == (6,)
    for k in range(1, 7):
        keep = order[:k]
        weight, delta = lstsq(stats, keep, fit_bias=fit_bias)
        expected = patch_error(stats, keep, weight, delta)
        # the curve is the ridge objective (error + ε‖W‖², ε = 1e-6 of the mean diagonal)
        assert expected - 1e-9 <= float(curve[k - 1]) <= expected + 1e-5
        assert float(exact[k - 1]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert (curve.diff() <= 0).all()


def test_lstsq_error_curve_duplicated_inputs_cost_nothing_at_half_width():
    stats, _ = patch_stats(0, c=8, dup=True)
    curve = lstsq_error_curve(stats, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    assert float(curve[3]) < 1e-5  # channels 0..3 span everything (up to the ridge)
    assert float(curve[2]) > 1e-2
    assert (curve.diff() <= 0).all()


def test_error_curves_bad_arguments():
    A, b, yy = channel_problem(0, c=4)
    order = torch.arange(4)
    with pytest.raises(ValueError, match="'order'"):
        scale_error_curve(A, b, yy, torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="'order'"):
        scale_error_curve(A, b, yy, torch.arange(3))
    with pytest.raises(ValueError, match="'counts'"):
        scale_error_curve(A, b, yy, order, [0, 2])
    with pytest.raises(ValueError, match="'counts'"):
        scale_error_curve(A, b, yy, order, [1.5])
    with pytest.raises(ValueError, match="'A'"):
        scale_error_curve(A[:3], b, yy, order)
    with pytest.raises(ValueError, match="'b'"):
        scale_error_curve(A, b[:3], yy, order)
    with pytest.raises(ValueError, match="'ridge'"):
        scale_error_curve(A, b, yy, order, ridge=-1.0)
    with pytest.raises(ValueError, match="'A'"):
        scale_error_curve(A * float("nan"), b, yy, order)
    with pytest.raises(TypeError, match="'stats'"):
        lstsq_error_curve((A, b), order)
    stats, _ = patch_stats(0, c=4)
    with pytest.raises(ValueError, match="'order'"):
        lstsq_error_curve(stats, torch.arange(5))


def test_error_curves_zero_target():
    A, b, _ = channel_problem(0, c=3)
    assert scale_error_curve(A, b * 0, 0.0, torch.arange(3)).tolist() == [0.0, 0.0, 0.0]


# --- the FLOPs model ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_flops_model_equals_predict_flops(seed):
    rng = np.random.default_rng(seed)
    units = tree_units([4, 6, 3, 5, 2], rng)
    units.append(BudgetUnit("twice", 4, ("leaf0", "self"), ("self",)))  # a module in both lists
    flops = {m: int(rng.integers(1, 100)) for u in units for m in (*u.out_modules, *u.in_modules)}
    total = sum(flops.values()) + 7
    free = [u.name for u in units if u.name != "u2"]  # u2 ignored: full width
    grids = {u.name: count_grid(u.width).numpy() for u in units}
    model = _FlopsModel(
        units,
        free,
        [grids[n] / w for n, w in ((u.name, u.width) for u in units) if n in free],
        flops,
        total,
    )
    for _ in range(20):
        x = np.array([rng.integers(0, len(grids[n])) for n in free])
        channels = {n: int(grids[n][i]) for n, i in zip(free, x, strict=True)}
        assert model.total(x) == pytest.approx(
            predict_flops(units, channels, flops, total), rel=1e-12
        )
        u = int(rng.integers(0, len(free)))
        for i, delta in enumerate(model.single(u, x)):
            moved = {**channels, free[u]: int(grids[free[u]][i])}
            assert model.total(x) + delta == pytest.approx(
                predict_flops(units, moved, flops, total), rel=1e-12
            )


# --- the global solve -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("shape", ["chain", "forest", "tree"])
@pytest.mark.parametrize("kind", ["smooth", "jagged"])
def test_allocate_equals_brute_force(seed, shape, kind):
    units, curves, flops, total, speedup = random_problem(seed, shape, kind=kind)
    alloc = allocate(units, curves, speedup=speedup, module_flops=flops, total_flops=total)
    assert isinstance(alloc, Allocation)
    assert alloc.solver == "tree dp"
    assert alloc.flops == predict_flops(units, alloc.channels, flops, total)
    assert alloc.target_flops == pytest.approx(total / speedup)
    assert alloc.cost == pytest.approx(sum(alloc.costs.values()))
    assert_matches_brute_force(alloc, units, curves, flops, total, speedup)


@pytest.mark.parametrize("seed", range(6))
def test_allocate_ignored_units_and_round_to(seed):
    units, curves, flops, total, _ = random_problem(seed, "chain", round_to=2)
    ignored = [units[1].name]
    curves.pop(units[1].name)  # ignored units need no curve
    smallest = {n: counts[0] for n, (counts, _) in curves.items()}
    speedup = 1 + 0.6 * (total / predict_flops(units, smallest, flops, total) - 1)
    alloc = allocate(
        units,
        curves,
        speedup=speedup,
        module_flops=flops,
        total_flops=total,
        ignored_layers=ignored,
        round_to=2,
    )
    assert alloc.channels[units[1].name] == units[1].width
    assert units[1].name not in alloc.costs
    for u in units:
        k = alloc.channels[u.name]
        assert k % 2 == 0 or k == u.width
    assert_matches_brute_force(alloc, units, curves, flops, total, speedup, ignored)


@pytest.mark.parametrize("seed", range(4))
def test_allocate_not_a_forest_falls_back_to_coordinate_descent(seed):
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(2, 6, 4)]
    units = chain_units(widths)
    units[3] = BudgetUnit("u3", widths[3], ("conv3",), ("conv0",))  # closes a cycle
    flops = {f"conv{i}": int(rng.integers(10, 200)) for i in range(4)}
    total = sum(flops.values())
    curves = {
        u.name: (count_grid(u.width).tolist(), np.sort(rng.random(u.width))[::-1].tolist())
        for u in units
    }
    alloc = allocate(units, curves, speedup=1.8, module_flops=flops, total_flops=total)
    assert alloc.solver == "coordinate descent"
    (under, cost), _, _ = brute_force(units, curves, flops, total, 1.8)
    assert alloc.flops <= total / 1.8 * (1 + 1e-9)
    # a local optimum: never better than the optimum, not always as good
    assert (max(0.98 * total / 1.8 - alloc.flops, 0), alloc.cost) >= (under - 1e-9, cost - 1e-12)


def test_allocate_not_a_forest_uses_the_budget_on_wider_units():
    rng = np.random.default_rng(0)
    units = chain_units([16, 32, 32, 64])
    units[3] = BudgetUnit("u3", 64, ("conv3",), ("conv0",))  # closes a cycle
    flops = {f"conv{i}": int(rng.integers(1000, 5000)) for i in range(4)}
    total = sum(flops.values())
    curves = {}
    for u in units:
        counts = count_grid(u.width).numpy()
        curves[u.name] = (counts, rng.uniform(0.5, 2) * (1 - counts / u.width) ** 2)
    alloc = allocate(units, curves, speedup=2.5, module_flops=flops, total_flops=total)
    assert alloc.solver == "coordinate descent"
    assert 0.98 * total / 2.5 <= alloc.flops <= total / 2.5


def test_allocate_uses_the_budget_on_a_vgg_like_chain():
    # 13 units, widths up to 512, every count allowed: FLOPs in [0.98, 1] x target
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    units = chain_units(widths)
    rng = np.random.default_rng(0)
    flops = {f"conv{i}": int(rng.integers(10**6, 10**8)) for i in range(14)}
    total = sum(flops.values())
    curves = {}
    for u in units:
        counts = count_grid(u.width, 8).numpy()
        curves[u.name] = (
            counts,
            rng.uniform(0.1, 3) * (1 - counts / u.width) ** rng.uniform(0.7, 3),
        )
    for speedup in (2.0, 4.0):
        alloc = allocate(
            units, curves, speedup=speedup, module_flops=flops, total_flops=total, round_to=8
        )
        assert 0.98 * total / speedup <= alloc.flops <= total / speedup


@pytest.mark.parametrize("method", ["lasso", "thinet"])
def test_allocate_prunes_the_redundant_unit_harder(method):
    # Two units of equal width and FLOPs. The consumer of "dup" reads channels 4..7 that
    # copy 0..3 (duplicated filters, read with the same weights).
    curves = {}
    for name, dup in (("dup", True), ("plain", False)):
        stats, W = patch_stats(1, c=8, taps=4, n=6, N=400, dup=dup)
        A, b = stats.channel_problem(W)
        counts = count_grid(8)
        order = channel_order(method, A=A, b=b)
        curves[name] = (counts, lstsq_error_curve(stats, order, counts))
    units = [BudgetUnit("dup", 8, ("c1",), ("c2",)), BudgetUnit("plain", 8, ("c3",), ("c4",))]
    flops = dict.fromkeys(("c1", "c2", "c3", "c4"), 100)
    alloc = allocate(units, curves, speedup=2.0, module_flops=flops, total_flops=400)
    assert alloc.channels["dup"] < alloc.channels["plain"]
    assert 0.98 * 200 <= alloc.flops <= 200
    if method == "lasso":  # LASSO keeps one channel of each pair: nothing lost at half width
        assert float(curves["dup"][1][3]) < 1e-5 < 1e-2 < float(curves["plain"][1][3])
        assert alloc.channels["dup"] <= 4


def test_allocate_speedup_one_and_everything_ignored():
    units = chain_units([3, 4])
    flops = {"conv0": 10, "conv1": 20, "conv2": 10}
    curves = {"u0": ([1, 2, 3], [2.0, 1.0, 0.0]), "u1": ([2, 4], [1.0, 0.0])}
    alloc = allocate(units, curves, speedup=1.0, module_flops=flops, total_flops=40)
    assert alloc.channels == {"u0": 3, "u1": 4} and alloc.cost == 0.0
    alloc = allocate(
        units, {}, speedup=1.5, module_flops=flops, total_flops=40, ignored_layers=["u0", "u1"]
    )
    assert alloc.channels == {"u0": 3, "u1": 4} and alloc.costs == {}


def test_allocate_unreachable_speedup_gives_the_maximum():
    units = chain_units([4, 4])
    flops = {"conv0": 10, "conv1": 20, "conv2": 10}
    curves = {"u0": ([2, 4], [1.0, 0.0]), "u1": ([2, 4], [1.0, 0.0])}
    # the smallest counts keep 5 + 5 + 5 = 15 of 40 FLOPs: at most 2.667x
    with pytest.raises(ValueError, match=r"'speedup'.*2\.667"):
        allocate(units, curves, speedup=3.0, module_flops=flops, total_flops=40)


@pytest.mark.parametrize(
    ("change", "error", "name"),
    [
        ({"units": [("u0", 3)]}, TypeError, "'units'"),
        ({"curves": [1, 2]}, TypeError, "'curves'"),
        ({"curves": {"u0": ([1, 2, 3], [1.0, 0.5, 0.0])}}, ValueError, r"'curves'.*'u1'"),
        ({"curves": {"zz": ([1], [0.0])}}, ValueError, r"'curves'.*unknown"),
        ({"u0": ([2, 1, 3], [1.0, 0.5, 0.0])}, ValueError, r"curves\['u0'\]"),
        ({"u0": ([1, 2, 5], [1.0, 0.5, 0.0])}, ValueError, r"curves\['u0'\]"),
        ({"u0": ([1.0, 2.0, 3.0], [1.0, 0.5, 0.0])}, ValueError, r"curves\['u0'\]"),
        ({"u0": ([1, 2, 3], [1.0, 0.5])}, ValueError, r"curves\['u0'\]"),
        ({"u0": ([1, 2, 3], [1.0, float("nan"), 0.0])}, ValueError, r"curves\['u0'\]"),
        ({"u0": [1, 2, 3]}, TypeError, r"curves\['u0'\]"),
        ({"round_to": 2}, ValueError, r"curves\['u0'\].*round_to"),
        ({"round_to": 0}, ValueError, "'round_to'"),
        ({"speedup": 0.5}, ValueError, "'speedup'"),
        ({"speedup": "2"}, TypeError, "'speedup'"),
        ({"speedup": float("inf")}, ValueError, "'speedup'"),
        ({"rtol": 0.0}, ValueError, "'rtol'"),
        ({"total_flops": 0}, ValueError, "'total_flops'"),
        ({"module_flops": [1]}, TypeError, "'module_flops'"),
        ({"ignored_layers": ["nope"]}, ValueError, "'ignored_layers'"),
        ({"ignored_layers": 3}, TypeError, "'ignored_layers'"),
    ],
)
def test_allocate_bad_arguments_name_the_argument(change, error, name):
    units = chain_units([3, 4])
    curves = {"u0": ([1, 2, 3], [1.0, 0.5, 0.0]), "u1": ([1, 2, 3, 4], [1.0, 0.6, 0.3, 0.0])}
    kwargs = {
        "units": units,
        "curves": curves,
        "speedup": 1.5,
        "module_flops": {"conv0": 10, "conv1": 20, "conv2": 10},
        "total_flops": 40,
    }
    if "u0" in change:
        kwargs["curves"] = {**curves, "u0": change.pop("u0")}
    kwargs.update(change)
    with pytest.raises(error, match=name):
        allocate(kwargs.pop("units"), kwargs.pop("curves"), **kwargs)


def test_cost_at_reads_and_interpolates_the_curves():
    curves = {
        "a": ([2, 4, 8], [1.0, 0.5, 0.0]),
        "b": (torch.tensor([1, 3]), torch.tensor([3.0, 1.0])),
    }
    assert cost_at(curves, {"a": 4, "b": 2, "c": 5}) == {"a": 0.5, "b": 2.0}
    assert cost_at(curves, {"a": 6}) == {"a": 0.25}
    units, curves, flops, total, speedup = random_problem(0, "chain")
    alloc = allocate(units, curves, speedup=speedup, module_flops=flops, total_flops=total)
    assert cost_at(curves, alloc.channels) == alloc.costs
    with pytest.raises(TypeError, match="'curves'"):
        cost_at([], {})


def curves_on(device: str):
    stats, W = patch_stats(2, c=6, taps=4, n=5)
    moved = PatchStats(6, 4, 5, device=device)
    moved.merge_(stats)
    A, b = moved.channel_problem(W)
    order = channel_order("thinet", A=A, b=b)
    return scale_error_curve(A, b, moved.yy, order), lstsq_error_curve(moved, order, [2, 6])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_error_curves_on_cuda_equal_cpu():
    for on_gpu, on_cpu in zip(curves_on("cuda"), curves_on("cpu"), strict=True):
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-9, atol=1e-12)
