"""The seed systems of the channel-pruning literature in recon: APoZ, Network Slimming
(bn_gamma, the global threshold, the BatchNorm sparsity penalty) and the fresh
initialisation behind Rethinking's scratch baselines. Tiny models, known answers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _dist import run_ranks, values
from torch import nn

import recon
from recon.budget import BudgetUnit, achieved_speedup
from recon.finetune import finetune
from recon.gather import _accumulate
from recon.graph import find_units, trace
from recon.layers import SampledConv2d
from recon.ranking import MIN_KEEP, global_channels
from recon.scores import channel_scores, global_scores
from recon.select import METHODS

# --------------------------------------------------------------------------- APoZ


def _relu_net() -> nn.Sequential:
    """1x1 identity producer + ReLU: the consumer reads max(x, 0) of the 3 input channels."""
    net = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        net[2].weight.copy_(torch.ones(2, 3, 1, 1))  # no channel favoured by the weights
        net[2].bias.zero_()
    return net.eval()


def _images(zero_fractions: list[float], n: int = 4, positions: int = 20) -> torch.Tensor:
    """(n, 3, 4, 5) images whose channel i is negative (0 after the ReLU) at exactly
    ``zero_fractions[i]`` of the positions of every image, positive elsewhere."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, positions, generator=g) + 0.5
    for i, frac in enumerate(zero_fractions):
        for img in range(n):
            where = torch.randperm(positions, generator=g)[: round(frac * positions)]
            x[img, i, where] *= -1
    return x.view(n, 3, 4, 5)


def test_apoz_counts_known_zero_fractions():
    net, x = _relu_net(), _images([0.0, 0.75, 0.5])
    unit = find_units(net).units[0]
    gm = trace(net)
    stats = _accumulate(
        unit, gm, gm, [x[:2], x[2:]], target=None, samples_per_image=3, seed=0, progress=False
    )
    # over every position, not only the 3 sampled ones
    torch.testing.assert_close(stats.apoz, torch.tensor([0.0, 0.75, 0.5], dtype=torch.float64))
    assert float(stats.entries) == 4 * 20
    # the same from the original network in one pass (allocation="global")
    got = global_scores("apoz", [unit], net, [x])["0"]
    torch.testing.assert_close(got, torch.tensor([1.0, 0.25, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("keep, kept", [(2, [0, 2]), (1, [0])])
def test_apoz_prunes_the_mostly_zero_channels(keep, kept):
    net, x = _relu_net(), _images([0.0, 0.75, 0.5])
    res = recon.prune(
        net, x, method="apoz", channels={"0": keep}, reconstruct="none", progress=False
    )
    assert res.kept["0"] == kept
    # the weights alone cannot tell the channels apart: l1 keeps the first ones
    l1 = recon.prune(net, x, method="l1", channels={"0": keep}, reconstruct="none", progress=False)
    assert l1.kept["0"] == list(range(keep))


def _apoz_rank(rank: int, world: int, x: torch.Tensor) -> list[int]:
    res = recon.prune(
        _relu_net(), x, method="apoz", channels={"0": 2}, reconstruct="none", progress=False
    )
    return res.kept["0"]


def test_apoz_under_two_ranks_equals_one_process():
    # Channel 0 is 60 % zeros in the first half of the images (rank 0's share), 0 % in
    # the second: 30 % over all. Channel 1 is 40 % zeros everywhere. Rank 0 alone would
    # drop channel 0; the summed counts drop channel 1.
    first, second = _images([0.6, 0.4, 0.0]), _images([0.0, 0.4, 0.0])
    x = torch.cat([first, second])
    one = _apoz_rank(0, 1, x)
    assert one == [0, 2]
    assert _apoz_rank(0, 1, first) == [1, 2]  # what a rank without the all-reduce would do
    assert values(run_ranks(_apoz_rank, x, timeout=240)) == [one, one]


# --------------------------------------------------------------------------- bn_gamma


def _bn_net(widths=(4,), gammas=None, seed: int = 0) -> nn.Sequential:
    """conv -> BN -> ReLU blocks on 1-channel 8x8 images, then a 3x3 conv head."""
    torch.manual_seed(seed)
    layers, c = [], 1
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    layers.append(nn.Conv2d(c, 2, 3, padding=1))
    net = nn.Sequential(*layers).eval()
    for i, g in enumerate(gammas or []):
        with torch.no_grad():
            net[3 * i + 1].weight.copy_(torch.as_tensor(g, dtype=torch.float32))
    return net


def test_bn_gamma_ranks_by_abs_gamma():
    net = _bn_net(gammas=[[0.5, -3.0, 0.1, 2.0]])
    unit = find_units(net).units[0]
    torch.testing.assert_close(
        channel_scores("bn_gamma", unit, net), torch.tensor([0.5, 3.0, 0.1, 2.0]).double()
    )
    x = torch.randn(8, 1, 8, 8)
    res = recon.prune(
        net, x, method="bn_gamma", channels={"0": 2}, reconstruct="none", progress=False
    )
    assert res.kept["0"] == [1, 3]  # |-3| and |2|: the sign does not matter


def test_bn_gamma_without_batchnorm_names_the_unit():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    with pytest.raises(ValueError, match=r"'method' argument 'bn_gamma'.*unit '0'.*no BatchNorm"):
        recon.prune(net, torch.randn(4, 1, 8, 8), method="bn_gamma", keep_ratio=0.5)
    # a BatchNorm without a scale has no gamma either
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match=r"unit '0'.*affine=False"):
        recon.prune(net.eval(), torch.randn(4, 1, 8, 8), method="bn_gamma", keep_ratio=0.5)


# --------------------------------------------------------------------------- global ranking


def test_global_allocation_meets_target_and_prunes_the_tiny_gamma_layer_first():
    g = torch.Generator().manual_seed(1)
    gammas = [0.5 + torch.rand(8, generator=g) for _ in range(3)]
    gammas[1] = 0.01 * torch.rand(8, generator=g)  # the middle layer's channels do little
    net = _bn_net(widths=(8, 8, 8), gammas=gammas)
    x = torch.randn(16, 1, 8, 8)
    res = recon.prune(
        net, x, method="bn_gamma", speedup=1.25, allocation="global", reconstruct="none",
        progress=False,
    )  # fmt: skip
    assert abs(res.report.speedup / 1.25 - 1) <= 0.02
    assert res.channels["3"] < 8  # the tiny layer loses channels ...
    assert res.channels["0"] == res.channels["6"] == 8  # ... and only it


def _units():
    return [
        BudgetUnit("a", 64, out_modules=("c1",), in_modules=("c2",)),
        BudgetUnit("b", 128, out_modules=("c2",), in_modules=("c3",)),
        BudgetUnit("c", 96, out_modules=("c3",), in_modules=("fc",)),
    ]


FLOPS = {"c1": 3_000, "c2": 50_000, "c3": 40_000, "fc": 2_000}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("round_to", [1, 4])
@pytest.mark.parametrize("speedup", [1.5, 2.5])
def test_global_channels_is_one_threshold_within_two_percent(seed, round_to, speedup):
    g = torch.Generator().manual_seed(seed)
    units = _units()
    scores = {u.name: torch.rand(u.width, generator=g) * (i + 1) for i, u in enumerate(units)}
    got = global_channels(
        units, scores, speedup=speedup, module_flops=FLOPS, total_flops=100_000,
        round_to=round_to, min_keep=0,
    )  # fmt: skip
    reached = achieved_speedup(units, got, FLOPS, 100_000)
    assert abs(reached / speedup - 1) <= 0.02
    for u in units:
        assert got[u.name] == u.width or got[u.name] % round_to == 0
    if round_to == 1:  # one threshold: every removed channel scores below every kept one
        removed, kept = [], []
        for u in units:
            order = torch.argsort(scores[u.name], descending=True, stable=True)
            kept += scores[u.name][order[: got[u.name]]].tolist()
            removed += scores[u.name][order[got[u.name] :]].tolist()
        assert max(removed) <= min(kept)


def test_global_channels_honours_ignored_layers_and_normalisation():
    units = _units()
    # "b"'s scores are ten times the others': raw, b is kept; normalised, it is not
    g = torch.Generator().manual_seed(0)
    scores = {u.name: torch.rand(u.width, generator=g) for u in units}
    scores["b"] = scores["b"] * 10 + 1
    kw = {"speedup": 1.5, "module_flops": FLOPS, "total_flops": 100_000}
    raw = global_channels(units, scores, **kw)
    assert raw["b"] == 128
    normalised = global_channels(units, scores, normalization="mean", **kw)
    assert normalised["b"] < 128
    ignored = global_channels(units, scores, ignored_layers=["a"], **kw)
    assert ignored["a"] == 64 and ignored["c"] < 96
    with pytest.raises(ValueError, match="'normalization' argument"):
        global_channels(units, scores, normalization="max", **kw)
    with pytest.raises(ValueError, match=r"'scores' argument .* for 'c'"):
        global_channels(units, {"a": scores["a"], "b": scores["b"]}, **kw)


@pytest.mark.parametrize("round_to", [1, 8])
def test_global_channels_floor_keeps_a_share_of_every_unit(round_to):
    units = _units()
    g = torch.Generator().manual_seed(0)
    scores = {u.name: 1 + torch.rand(u.width, generator=g) for u in units}
    scores["b"] = 1e-3 * scores["b"]  # every channel of b ranks first
    kw = {"speedup": 2.0, "module_flops": FLOPS, "total_flops": 100_000, "round_to": round_to}
    floor = -(-math.ceil(0.6 * 128) // round_to) * round_to  # 77 channels, rounded up
    bare = global_channels(units, scores, min_keep=0, **kw)
    assert bare["b"] < floor and bare["a"] == 64 and bare["c"] == 96  # only b is cut
    got = global_channels(units, scores, min_keep=0.6, **kw)
    assert got["b"] == floor
    assert got["a"] < 64 or got["c"] < 96  # the rest of the cut falls on the others
    assert abs(achieved_speedup(units, got, FLOPS, 100_000) / 2.0 - 1) <= 0.02


def test_global_channels_floor_that_cannot_reach_the_target_is_an_error():
    units = _units()
    scores = {u.name: torch.ones(u.width) for u in units}
    kw = {"module_flops": FLOPS, "total_flops": 100_000}
    with pytest.raises(ValueError, match=r"'min_keep' argument .* at most 1\.\d+.* target is 3"):
        global_channels(units, scores, speedup=3.0, min_keep=0.8, **kw)
    for bad in (-0.1, 1.0, "0.2", True, float("nan")):
        with pytest.raises(ValueError, match="'min_keep' argument must be a float in"):
            global_channels(units, scores, speedup=1.5, min_keep=bad, **kw)


def test_prune_min_keep():
    net = _bn_net(widths=(8, 8, 8), gammas=[[1.0] * 8, [0.01] * 8, [1.0] * 8])
    x = torch.randn(8, 1, 8, 8)

    def calib():  # a calibration set that must not be read
        raise AssertionError("calibration read before the argument was checked")
        yield

    with pytest.raises(ValueError, match="'min_keep' argument must be a float in"):
        recon.prune(net, calib(), method="l1", speedup=1.5, allocation="global",
                    min_keep=-1, progress=False)  # fmt: skip
    for allocation in ("auto", "uniform"):  # the floor is the global allocations' only
        with pytest.raises(ValueError, match="'min_keep' argument is the floor of the global"):
            recon.prune(net, calib(), method="l1", speedup=1.5, allocation=allocation,
                        min_keep=0.1, progress=False)  # fmt: skip
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"'min_keep' argument .* at most"):
        recon.prune(net, x, method="bn_gamma", speedup=3.0, allocation="global",
                    min_keep=0.9, progress=False)  # fmt: skip
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    kw = {"method": "bn_gamma", "speedup": 2.0, "allocation": "global", "progress": False}
    bare = recon.prune(net, x, min_keep=0, reconstruct="none", **kw)
    assert bare.channels == {"0": 8, "3": 3, "6": 8}  # the threshold cuts the tiny-γ layer only
    res = recon.prune(net, x, min_keep=0.5, reconstruct="none", **kw)
    assert res.channels["3"] == 4 and res.channels["0"] < 8  # it stops at half its width
    assert res.plan["options"]["min_keep"] == 0.5


def test_global_allocation_round_to_and_ignored_layers_in_prune():
    net = _bn_net(widths=(8, 8, 8), gammas=[[1.0] * 8, [0.01] * 8, [1.0] * 8])
    x = torch.randn(8, 1, 8, 8)
    res = recon.prune(
        net, x, method="l1", speedup=1.3, allocation="global_normalized", round_to=4,
        ignored_layers=["3"], reconstruct="none", progress=False,
    )  # fmt: skip
    assert res.channels["3"] == 8
    assert all(c in (4, 8) for c in res.channels.values())
    assert res.plan["options"]["allocation"] == "global_normalized"


@pytest.mark.parametrize("method", ["lasso", "thinet", "first_k", "random"])
def test_global_allocation_needs_a_score_method(method):
    net = _bn_net()
    with pytest.raises(ValueError, match=r"'allocation' argument 'global'.*score method"):
        recon.prune(net, torch.randn(4, 1, 8, 8), method=method, speedup=1.5, allocation="global")


def test_global_allocation_needs_a_speedup():
    with pytest.raises(ValueError, match=r"'allocation' argument 'global'.*speedup"):
        recon.prune(_bn_net(), torch.randn(4, 1, 8, 8), method="l1", keep_ratio=0.5,
                    allocation="global")  # fmt: skip


def test_cli_offers_every_method_and_allocation():
    from recon.api import ALLOCATIONS
    from recon.cli import build_parser

    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    choices = {a.dest: a.choices for a in prune._actions if a.choices}
    assert tuple(choices["method"]) == METHODS
    assert set(choices["allocation"]) == set(ALLOCATIONS)
    assert prune.parse_args([]).min_keep == MIN_KEEP
    assert prune.parse_args(["--min-keep", "0"]).min_keep == 0.0


# --------------------------------------------------------------------------- bn_l1


def _train_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 2, (64,), generator=g)


def _gammas(net: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten() for m in net if isinstance(m, nn.BatchNorm2d)])


def _flat_head(net: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*net, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_bn_l1_drives_gammas_toward_zero():
    x, y = _train_data()
    plain = _flat_head(_bn_net(widths=(4, 4)))
    sparse = copy.deepcopy(plain)
    kw = {"steps": 20, "lr": 0.05, "batch_size": 16, "augment": False, "progress": False}
    finetune(plain, x, y, **kw)
    finetune(sparse, x, y, bn_l1=0.5, **kw)
    assert float(_gammas(sparse).abs().sum()) < 0.5 * float(_gammas(plain).abs().sum())


def test_bn_l1_is_the_subgradient_and_zero_is_plain_training():
    x, y = _train_data()
    base = _flat_head(_bn_net(widths=(4,), gammas=[[0.5, -1.0, 0.0, 2.0]]))
    kw = {"steps": 1, "lr": 0.1, "batch_size": 16, "weight_decay": 0.0, "progress": False}
    plain, zero, lam = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    finetune(plain, x, y, **kw)
    finetune(zero, x, y, bn_l1=0.0, **kw)
    finetune(lam, x, y, bn_l1=0.01, **kw)
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # λ = 0 is plain training, bit for bit
    # one SGD step: γ moves by an extra -lr·λ·sign(γ) (sign(0) = 0); nothing else changes
    want = _gammas(plain) - 0.1 * 0.01 * torch.tensor([1.0, -1.0, 0.0, 1.0])
    # float32 rounding of γ ≈ 2 (an ulp is 2.4e-7), far below the 1e-3 step under test
    torch.testing.assert_close(_gammas(lam), want, rtol=0, atol=1e-6)
    for (name, a), b in zip(plain.state_dict().items(), lam.state_dict().values(), strict=True):
        if name != "1.weight":
            assert torch.equal(a, b), name


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bn_l1_must_be_a_finite_float_at_least_zero(bad):
    x, y = _train_data()
    with pytest.raises(ValueError, match=r"'bn_l1' argument must be a finite float >= 0"):
        finetune(_flat_head(_bn_net()), x, y, steps=1, bn_l1=bad, progress=False)


# --------------------------------------------------------------------------- reinit


def test_reinit_same_architecture_new_seeded_weights_input_untouched():
    net = _bn_net(widths=(8, 8))
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
    pruned = recon.prune(
        net, torch.randn(8, 1, 8, 8), keep_ratio=0.5, method="l1", reconstruct="none",
        progress=False,
    ).model  # fmt: skip
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    state = torch.random.get_rng_state()
    fresh = recon.reinit(pruned, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global random state untouched
    assert fresh is not pruned and str(fresh) == str(pruned)  # same architecture
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    assert shapes == {k: v.shape for k, v in before.items()}
    for k, v in pruned.state_dict().items():  # the input model is unchanged
        assert torch.equal(v, before[k]), k
    assert not torch.equal(fresh[0].weight, pruned[0].weight)  # new weights
    assert torch.equal(fresh[1].running_mean, torch.zeros(4))  # BN statistics reset
    assert torch.equal(fresh[1].weight, torch.ones(4))
    again, other = recon.reinit(pruned, seed=1), recon.reinit(pruned, seed=2)
    for (k, a), b in zip(
        fresh.state_dict().items(),
        again.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), k  # deterministic by seed
    assert not torch.equal(fresh[3].weight, other[3].weight)  # another seed, other weights
    assert fresh(torch.randn(2, 1, 8, 8)).shape == (2, 2, 8, 8)


def test_reinit_keeps_sampler_indices():
    conv = SampledConv2d.from_conv(nn.Conv2d(4, 3, 3), [0, 3])
    fresh = recon.reinit(nn.Sequential(conv), seed=0)
    assert fresh[0].sampler.index.tolist() == [0, 3]
    assert not torch.equal(fresh[0].weight, conv.weight)


def test_reinit_with_the_architectures_own_init():
    from recon.models import VGG, vgg11

    net = vgg11(width=0.125, in_channels=1, num_classes=10, input_size=32)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
    fresh = recon.reinit(net, seed=3, init=VGG.init_weights)
    default = recon.reinit(net, seed=3)
    # VGG's own scheme: linear N(0, 0.01) with zero bias, where PyTorch's default draws
    # U(±1/sqrt(fan_in)) for both (fan_in = 64 here: bound 0.125)
    w = fresh.classifier.weight
    assert 0.005 < float(w.std()) < 0.02 and torch.equal(fresh.classifier.bias, torch.zeros(10))
    assert float(default.classifier.bias.abs().max()) > 0.02
    conv = fresh.features[0]
    fan_out = conv.out_channels * 9
    assert float(conv.weight.std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.3)
    again = recon.reinit(net, seed=3, init=VGG.init_weights)
    for (k, a), b in zip(fresh.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(TypeError, match="'init' argument must be a callable"):
        recon.reinit(net, seed=0, init="kaiming")


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_reinit_bad_seed(seed):
    with pytest.raises(ValueError, match="'seed' argument must be an int >= 0"):
        recon.reinit(nn.Linear(2, 2), seed=seed)
    with pytest.raises(TypeError, match="'model' argument"):
        recon.reinit("model", seed=0)
