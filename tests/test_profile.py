"""recon.profile: the error curves allocation='auto' trades, as expected held out."""

from __future__ import annotations

import pytest
import torch

import recon
from recon.allocate import count_grid, lstsq_error_curve, scale_error_curve
from recon.profile import _curve, _flat_output, _probe_fit
from recon.solve import cv_lstsq, lstsq
from recon.stats import PatchStats

C, TAPS, N_OUT = 8, 4, 6  # p = k*TAPS + 1 unknowns per output, up to 33


def _stats(samples: int, seed: int = 0) -> tuple[PatchStats, torch.Tensor]:
    """y = W x + noise from ``samples`` patches in 4 folds; W uses every channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, C * TAPS, generator=g, dtype=torch.float64)
    w = torch.randn(N_OUT, C, TAPS, generator=g, dtype=torch.float64)
    y = x @ w.reshape(N_OUT, -1).T + 0.3 * torch.randn(
        samples, N_OUT, generator=g, dtype=torch.float64
    )
    stats = PatchStats(C, TAPS, N_OUT, folds=4)
    stats.update(x, y, fold=torch.arange(samples) % 4)
    return stats, w


@pytest.mark.parametrize("samples", [24, 40, 400])
def test_the_lstsq_curve_is_the_held_out_estimate_capped_by_the_scale_fit(samples):
    stats, w = _stats(samples)
    A, b = stats.channel_problem(w)
    order, counts = torch.arange(C), count_grid(C, 1)
    inside = lstsq_error_curve(stats, order, counts)
    capped = scale_error_curve(A, b, stats.yy, order, counts)
    curve = _curve(stats, A, b, order, counts, "lstsq")
    assert curve.shape == counts.shape
    assert bool((curve[1:] <= curve[:-1]).all())  # never increasing in k
    assert bool((curve <= capped + 1e-12).all())
    assert bool((curve >= inside.cummin(0).values - 1e-12).all())  # held out >= in-sample
    p = counts * TAPS + 1
    over = p >= samples  # interpolating counts: at most the scale fit's error, not 0
    if over.any():
        assert bool((curve[over] > 0).all()) and bool((inside[over] < 1e-4).all())
    if samples == 400:  # well determined: in-sample error times (N + p) / (N - p)
        expected = torch.minimum(inside * (400 + p) / (400 - p), capped).cummin(0).values
        assert torch.allclose(curve, expected, rtol=1e-12)


def test_the_plain_curve_charges_interpolation_a_relative_error_of_one():
    stats, w = _stats(24)
    A, b = stats.channel_problem(w)
    order, counts = torch.arange(C), count_grid(C, 1)
    curve = _curve(stats, A, b, order, counts, "lstsq_plain")
    over = counts * TAPS + 1 >= 24
    assert over.any() and bool((curve[over] <= 1).all())
    assert float(curve[~over][-1]) > float(lstsq_error_curve(stats, order, counts)[~over][-1])


def test_the_probe_is_fitted_as_pruning_fits_it():
    stats, w = _stats(40)
    A, b = stats.channel_problem(w)
    keep = torch.tensor([0, 2, 3, 5, 7])
    weight, bias = _probe_fit(stats, A, b, keep, w, "lstsq")
    fit = cv_lstsq(stats, keep, w)
    assert torch.equal(weight, fit.weight) and torch.equal(bias, fit.bias_delta)
    weight, bias = _probe_fit(stats, A, b, keep, w, "lstsq_plain")
    plain = lstsq(stats, keep, fit_bias=True)
    assert torch.equal(weight, plain[0]) and torch.equal(bias, plain[1])


class _TwoHeads(torch.nn.Module):
    """A small CNN whose output is a dict of two tensors, as multi-head models return."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        h = self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return {"logits": h.mean((2, 3)), "aux": (h[:, :2].flatten(1),)}


def test_auto_measures_an_output_made_of_several_tensors():
    torch.manual_seed(0)
    net, x = _TwoHeads().eval(), torch.randn(40, 3, 8, 8)
    result = recon.prune(net, x, speedup=1.6, progress=False)  # auto: the default
    assert result.report.allocation is not None
    assert result.report.speedup == pytest.approx(1.6, rel=0.02)
    out = _flat_output({"a": torch.ones(5, 2, 3), "b": [torch.zeros(5, 4)]})
    assert out.shape == (5, 10) and out.dtype == torch.float64
    assert float(out[:, :6].sum()) == 30 and float(out[:, 6:].abs().sum()) == 0
    with pytest.raises(TypeError, match="allocation='uniform'"):
        _flat_output("not a tensor")


def test_profile_follows_a_wide_lasso_path_for_its_first_steps_only(monkeypatch):
    """Past LASSO_ORDER_STEPS channels the profile's LASSO order is the fallback score's
    (a whole 2,048-channel LARS path costs tens of seconds); narrower units are exact."""
    from recon import profile
    from recon.select import lasso_order

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, dtype=torch.float64, generator=g)
    y = (
        X @ torch.randn(12, dtype=torch.float64, generator=g)
        + torch.randn(200, generator=g).double()
    )
    A, b = X.T @ X, X.T @ y
    whole = lasso_order(A, b)
    assert torch.equal(profile._order(A, b, None, None, "lasso", 0, "lstsq", "u"), whole)
    monkeypatch.setattr(profile, "LASSO_ORDER_STEPS", 3)
    capped = profile._order(A, b, None, None, "lasso", 0, "lstsq", "u")
    assert torch.equal(capped, lasso_order(A, b, max_active=3))
    assert torch.equal(capped[:3], whole[:3]) and not torch.equal(capped, whole)
