"""The allocation profile (recon.profile): one pass for every unit's statistics, and the
output sensitivities from one backward pass against the per-unit probes they replace."""

import pytest
import torch
from nets import randomize_bn
from test_allocation_api import _images, _redundant_chain
from test_sensitivity import _models

import recon
from recon.gather import CV_FOLDS, _accumulate, accumulate_all, stats_bytes, stats_tensors
from recon.graph import find_units, trace
from recon.passes import Passes
from recon.profile import _chunks


@pytest.mark.parametrize("name", ["grouped", "resnet", "fire", "dense"])
@pytest.mark.parametrize("folds", [1, CV_FOLDS])
def test_one_pass_gives_every_unit_the_statistics_of_its_own_pass(name, folds):
    net = randomize_bn(_models()[name]).eval()
    gm = trace(net)
    units = find_units(net, gm).units
    x = torch.randn(10, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    batches, offsets = [x[:4], x[4:]], [0, 4]
    kw = dict(samples_per_image=3, seed=7, folds=folds)
    together = accumulate_all(units, gm, batches, offsets, zeros=True, **kw)
    passes = Passes(
        gm, gm, batches, list(units), {u.name: None for u in units}, [],
        samples_per_image=3, seed=7, cache_bytes=1 << 30, final=False,
    )  # fmt: skip
    for step, unit in enumerate(units):
        alone = _accumulate(
            unit, gm, gm, batches, target=None, passes=passes, step=step, progress=False, **kw
        )
        passes.drop_targets(step)
        passes.kept(step, None)
        mine, theirs = stats_tensors(together[unit.name]), stats_tensors(alone)
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=unit.name)


def test_units_are_chunked_to_fit_the_budget():
    net = _models()["resnet"]
    units = find_units(net, trace(net)).units
    sizes = [stats_bytes(u, net, 1) for u in units]
    assert all(s > 0 for s in sizes)
    assert [len(c) for c in _chunks(units, net, 1, 0)] == [1] * len(units)  # one pass each
    assert [len(c) for c in _chunks(units, net, 1, sum(sizes))] == [len(units)]
    half = _chunks(units, net, 1, sum(sizes) // 2)
    assert 2 <= len(half) <= 3 and [u for c in half for u in c] == list(units)


@pytest.mark.parametrize("sensitivity", ["gradient", "probe"])
def test_both_sensitivities_prune_the_redundant_layer_harder(sensitivity, monkeypatch):
    import functools

    from recon import api, profile

    monkeypatch.setattr(
        api, "profile_units", functools.partial(profile.profile_units, sensitivity=sensitivity)
    )
    net, x = _redundant_chain(), _images()
    auto = recon.prune(net, x, speedup=2.0, allocation="auto", progress=False)
    uniform = recon.prune(net, x, speedup=2.0, allocation="uniform", progress=False)
    assert auto.channels["conv1"] < uniform.channels["conv1"]
    assert auto.channels["conv1"] <= 10  # 8 distinct filters (and rounding)
    rows = {r.name: r for r in auto.report.allocation.rows}
    assert all(r.sensitivity > 0 for r in rows.values())


def test_the_gradient_sensitivity_needs_no_held_out_images():
    net, x = _redundant_chain(), _images(40)
    res = recon.prune(net, x, speedup=2.0, allocation="auto", progress=False)
    alloc = res.report.allocation
    assert alloc.images == 40  # every image behind the statistics
    assert alloc.heldout_images == 40  # and the sensitivities from the same images


def test_a_bad_sensitivity_is_a_clear_error():
    from recon.profile import profile_units

    with pytest.raises(ValueError, match="'sensitivity'"):
        profile_units(
            None, None, [], [], [], {}, method="obs", reconstruct="lstsq", round_to=1,
            samples_per_image=10, seed=0, cache_bytes=0, sensitivity="hessian",
        )  # fmt: skip


# ---------------------------------------------------------------- few calibration images


def test_trust_falls_as_the_unknowns_near_the_samples():
    from recon.profile import trust

    assert trust(100, 50) == pytest.approx(0.5)
    assert trust(10_000, 577) == pytest.approx(0.9423)
    assert trust(320, 577) == 0.0 and trust(0, 1) == 0.0
    assert trust(10, 0) == 1.0


@pytest.mark.parametrize(
    ("trust", "allowed"), [(0.0, [4]), (0.5, [3, 4, 5, 6]), (1.0, list(range(1, 9)))]
)
def test_a_unit_moves_from_the_uniform_count_as_far_as_it_is_trusted(trust, allowed):
    from recon.profile import Profile, UnitProfile

    counts = torch.arange(1, 9)
    err = torch.linspace(1, 0, 8, dtype=torch.float64)
    unit = UnitProfile(counts, err, 4, 0.1, 2.0, uniform=4, trust=trust)
    assert counts[unit.allowed].tolist() == allowed
    got_counts, got_costs = Profile({"u": unit}, 10, 10).curves()["u"]
    assert got_counts.tolist() == allowed
    torch.testing.assert_close(got_costs, 2.0 * err[unit.allowed])


@pytest.mark.parametrize("images", [1, 4])
def test_with_a_handful_of_images_auto_falls_back_to_the_uniform_split(images):
    net = _redundant_chain()
    few, many = _images(images), _images()
    auto = recon.prune(net, few, speedup=2.0, allocation="auto", progress=False)
    uniform = recon.prune(net, few, speedup=2.0, allocation="uniform", progress=False)
    rows = auto.report.allocation.rows
    assert all(r.trust == 0.0 for r in rows)  # 10 or 40 samples, ~100 unknowns per output
    assert auto.channels == uniform.channels  # (also where uniform is just over the target)
    # with many images it is free again and finds the redundant layer (as before)
    auto = recon.prune(net, many, speedup=2.0, allocation="auto", progress=False)
    assert all(r.trust > 0.8 for r in auto.report.allocation.rows)
    assert auto.channels["conv1"] < uniform.channels["conv1"]
