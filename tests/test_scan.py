"""Li et al.'s sensitivity scan: curves per unit, the keep_ratio helper, the plot."""

from __future__ import annotations

import itertools

import pytest
import torch
from nets import quiet_prune
from torch import nn

import recon
from recon.scan import ScanResult, _at

RATIOS = (0.75, 0.5, 0.25)


class Toy(nn.Module):
    """Three convs; ``conv2``'s eight channels are four channels twice over, so its unit
    (read by ``conv3``) can lose half of them with no error once ``conv3`` is re-fitted."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.conv3, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            self.conv2.weight[4:] = self.conv2.weight[:4]
            self.conv2.bias[4:] = self.conv2.bias[:4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def scan():
    torch.manual_seed(0)
    net = Toy().eval()
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = recon.sensitivity_scan(
        net, x, x[:48], ratios=RATIOS, reconstruct=("lstsq", "none"), progress=False,
        prune_options={"samples_per_image": None},
    )  # fmt: skip
    return net, x, out


def test_curves_are_monotone_and_find_the_redundant_layer(scan):
    _, _, s = scan
    assert s.metric == "output_error" and s.baseline == 0.0 and s.ratios == RATIOS
    assert set(s.curves) == {"lstsq", "none"}
    assert set(s.widths) == {"conv1", "conv2", "conv3"}
    for rec, curves in s.curves.items():
        for unit, values in curves.items():
            # fewer channels, more error: each curve rises as the ratio falls
            assert all(b >= a - 1e-9 for a, b in itertools.pairwise(values)), (
                rec,
                unit,
                values,
            )
    # conv2 keeps 4 of its 8 duplicated channels: the re-fit loses nothing, no re-fit does
    assert s.curves["lstsq"]["conv2"][1] < 1e-6
    assert s.curves["none"]["conv2"][1] > 1e-2
    assert min(s.curves["lstsq"][u][1] for u in ("conv1", "conv3")) > 1e-3
    assert s.channels["conv2"] == [6, 4, 2]


def test_keep_ratio_prunes_the_insensitive_units_only(scan):
    net, x, s = scan
    assert s.sensitive(0.5, tolerance=1e-3) == ["conv1", "conv3"]
    # the sensitive units keep their safe ratios: the lowest scanned within tolerance
    safe = {u: s.safe_ratio(u, tolerance=1e-3) for u in ("conv1", "conv3")}
    assert all(r > 0.5 for r in safe.values())
    assert s.keep_ratio(ratio=0.5, tolerance=1e-3) == {**safe, "conv2": 0.5}
    # without the re-fit the redundant layer is as sensitive as the others
    assert s.keep_ratio(ratio=0.5, tolerance=1e-3, reconstruct="none")["conv2"] > 0.5
    # a FLOPs target: the sensitive units at their safe ratios, the rest share what meets it
    half = quiet_prune(net, x, keep_ratio={"conv2": 0.5}).report.speedup
    ratios = s.keep_ratio(speedup=half, tolerance=1e-3)
    drops = s.drop()
    for u, r in ratios.items():  # within tolerance at its ratio, or at its safe ratio
        assert _at(s.ratios, drops[u], r) <= 1e-3 or r == s.safe_ratio(u, tolerance=1e-3)
    assert ratios["conv1"] == 1.0 and ratios["conv2"] < 1.0
    res = quiet_prune(net, x, keep_ratio=ratios)
    assert res.report.speedup >= 0.98 * half
    # a target that needs the sensitive units too
    with pytest.raises(ValueError, match=r"'speedup' argument 4\.0 cannot be met"):
        s.keep_ratio(speedup=4.0, tolerance=1e-3)


def test_as_dict_round_trip_and_accuracy_metric(scan, tmp_path):
    net, x, s = scan
    back = ScanResult.from_dict(s.as_dict(), net, x[:1])
    assert back.as_dict() == s.as_dict()
    assert back.keep_ratio(speedup=1.1, tolerance=1e-3) == s.keep_ratio(speedup=1.1, tolerance=1e-3)
    y = net(x).argmax(1)
    acc = recon.sensitivity_scan(
        net, x, (x, y), ratios=(0.5,), reconstruct="lstsq", units=["conv2"], progress=False
    )
    assert acc.metric == "accuracy" and acc.baseline == 1.0
    assert list(acc.curves["lstsq"]) == ["conv2"]
    assert acc.drop()["conv2"][0] <= 0.05
    # unscanned units stay whole when a target is met
    ratios = acc.keep_ratio(speedup=1.1)
    assert set(ratios) == {"conv2"}


def test_plot_draws_one_panel_per_refit(scan, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, s = scan
    fig = s.plot(str(tmp_path / "scan.png"))
    assert len(fig.axes) == 2 and (tmp_path / "scan.png").stat().st_size > 0


def test_reading_a_curve_between_ratios():
    assert _at((0.5,), [0.2], 1.0) == 0.0
    assert _at((0.5,), [0.2], 0.75) == pytest.approx(0.1)
    assert _at((0.5, 0.25), [0.2, 0.6], 0.25) == pytest.approx(0.6)
    assert _at((0.5, 0.25), [0.2, 0.6], 0.1) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratios": (1.5,)}, ValueError, r"'ratios' argument must hold floats in \(0, 1\)"),
        ({"ratios": 0.5}, TypeError, "'ratios' argument must be a sequence"),
        ({"reconstruct": "bogus"}, ValueError, "'reconstruct' argument must be one of"),
        ({"units": ["nope"]}, ValueError, "'units' argument must name prunable units"),
        ({"batch_size": 0}, ValueError, "'batch_size'"),
        ({"prune_options": {"channels": {}}}, ValueError, "'prune_options'"),
    ],
)
def test_bad_scan_arguments(scan, kwargs, error, match):
    net, x, _ = scan
    with pytest.raises(error, match=match):
        recon.sensitivity_scan(net, x, x, progress=False, **({"ratios": (0.5,)} | kwargs))


def test_bad_val_and_helper_arguments(scan):
    net, x, s = scan
    with pytest.raises(TypeError, match="'val' argument must be float images"):
        recon.sensitivity_scan(net, x, "x", ratios=(0.5,), progress=False)
    with pytest.raises(ValueError, match="'val' argument's labels"):
        recon.sensitivity_scan(net, x, (x, x), ratios=(0.5,), progress=False)
    with pytest.raises(ValueError, match="Exactly one of the 'ratio' and 'speedup'"):
        s.keep_ratio()
    with pytest.raises(ValueError, match="'tolerance' argument must be a finite float >= 0"):
        s.keep_ratio(ratio=0.5, tolerance=-1)
    with pytest.raises(ValueError, match="'reconstruct' argument must be one of the re-fits"):
        s.keep_ratio(ratio=0.5, reconstruct="scale")
    with pytest.raises(ValueError, match=r"'ratio' argument must be a float in \(0, 1\]"):
        s.sensitive(0.0)
