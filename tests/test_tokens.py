"""Units over the last dimension: MLPs and attention heads, read at every token.

An MLP ``fc1 -> GELU -> fc2`` (ConvNeXt's inverted bottleneck after its permute to
channels-last and LayerNorm, the MLP blocks of ViT, Swin and MaxViT): the hidden
features are the unit's channels, sampled at token positions as a conv's pixels are,
and fc2 is re-fitted on the kept ones. The heads of a self-attention layer
(``nn.MultiheadAttention``): each head is a channel of ``head_dim`` features read by
the output projection, which is re-fitted on the kept heads.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import recon
from recon.budget import count_flops
from recon.convnext import cifar_convnext
from recon.graph import find_units
from recon.layers import HeadAttention
from recon.select import METHODS

torchvision = pytest.importorskip("torchvision")


class Mixer(nn.Module):
    """Patchify conv -> tokens (B, T, 8) -> pre-norm MLP block with a residual -> head."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # (B, T, 8)
        t = t + self.fc2(self.drop(self.act(self.fc1(self.norm(t)))))
        return self.head(t.mean(1))  # (B, 5)


class Attender(nn.Module):
    """Patchify conv -> tokens (B, T, 16) -> pre-norm 4-head self-attention + x -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # (B, T, 16)
        n = self.norm(t)
        t = t + self.attn(n, n, n, need_weights=False)[0]
        return self.head(t.mean(1))  # (B, 5)


def _attender(seed: int = 0) -> Attender:
    torch.manual_seed(seed)
    return Attender().eval()


def _mixer(seed: int = 0) -> Mixer:
    torch.manual_seed(seed)
    return Mixer().eval()


X = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
CALIB, HELD = X[:32], X[32:]


def _rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b) ** 2).sum() / (b**2).sum())


def _prune(net: nn.Module, **kw) -> recon.PruneResult:
    kw.setdefault("progress", False)
    kw.setdefault("allocation", "uniform")
    return recon.prune(net, CALIB, **kw)


# --------------------------------------------------------------------------- discovery


def test_the_mlp_of_a_hand_written_block_is_a_tokens_unit():
    graph = find_units(_mixer())
    assert [(u.name, u.consumer, u.consumer_kind, u.width, u.taps) for u in graph.units] == [
        ("fc1", "fc2", "tokens", 24, 1)
    ]
    # fc2 feeds the residual add; the head the output: neither is a unit
    assert "fc2" in graph.skipped and "head" not in graph.skipped


def test_a_linear_that_is_not_an_mlp_is_not_a_unit():
    class Gated(nn.Module):  # fc1's features multiplied by another tensor: coupled
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.gate, self.fc2 = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(self.fc1(x) * self.gate(x))

    graph = find_units(Gated())
    assert graph.units == []
    assert "combines it with other values" in graph.skipped["fc1"]


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    net = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5)
    for m in net.modules():  # torchvision starts the layer scales at 1e-6
        if hasattr(m, "layer_scale"):
            m.layer_scale.data.fill_(0.5)
    return net.eval()


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(16, 4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    nn.init.normal_(net.heads.head.weight, std=0.3)  # torchvision starts it at zero
    return net.eval()


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer([2, 2], 16, [1, 1], [2, 2], [2, 2], num_classes=5).eval()


@pytest.mark.parametrize(
    "build, mlps, hidden",
    [
        (_tv_convnext, ["features.1.0.block.3", "features.3.0.block.3"], [64, 128]),
        (_tv_vit, [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in (0, 1)], [32, 32]),
        (_tv_swin, ["features.1.0.mlp.0", "features.3.0.mlp.0"], [64, 128]),
    ],
    ids=["convnext", "vit", "swin"],
)
def test_units_are_found_on_the_torchvision_builders(build, mlps, hidden):
    graph = find_units(build())
    tokens = [u for u in graph.units if u.consumer_kind == "tokens"]
    assert [u.name for u in tokens] == mlps
    assert [u.width for u in tokens] == hidden
    assert not graph.unsupported


# --------------------------------------------------------------------------- pruning


def test_keep_all_reproduces_the_outputs():
    net = _mixer()
    result = _prune(net, keep_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(result.model(HELD), net(HELD), rtol=1e-5, atol=1e-5)


def test_a_duplicated_hidden_feature_is_found_and_removed_exactly():
    net = _mixer()
    with torch.no_grad():  # hidden feature 7 is a copy of feature 3
        net.fc1.weight[7] = net.fc1.weight[3]
        net.fc1.bias[7] = net.fc1.bias[3]
    result = _prune(net, channels={"fc1": 23})  # obs: the re-fitted error
    dropped = set(range(24)) - set(result.kept["fc1"])
    assert dropped in ({3}, {7})
    assert result.model.fc1.out_features == 23 and result.model.fc2.in_features == 23
    with torch.no_grad():  # fc2 re-fitted: the kept copy carries both columns
        assert _rel(result.model(HELD), net(HELD)) < 1e-9


@pytest.mark.parametrize("method", [m for m in METHODS if m != "bn_gamma"])
def test_every_method_runs(method):
    result = _prune(_mixer(), keep_ratio=0.5, method=method)
    assert result.model.fc1.out_features == 12
    with torch.no_grad():
        assert torch.isfinite(result.model(HELD)).all()


def test_bn_gamma_says_an_mlp_has_no_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm lies between 'fc1' and 'fc2'"):
        _prune(_mixer(), keep_ratio=0.5, method="bn_gamma")


def test_the_refit_beats_no_refit_at_half_width():
    net = _mixer()
    fit = _prune(net, keep_ratio=0.5)
    none = _prune(net, keep_ratio=0.5, reconstruct="none")
    with torch.no_grad():
        ref = net(HELD)
        assert _rel(fit.model(HELD), ref) < 0.7 * _rel(none.model(HELD), ref)


def test_save_load_and_apply_plan_reproduce_the_pruned_model(tmp_path):
    result = _prune(_mixer(), keep_ratio=0.5)
    path = tmp_path / "mixer.recon"
    recon.save(result, path)
    with torch.no_grad():
        expected = result.model(HELD)
        assert torch.equal(recon.load(path, _mixer).eval()(HELD), expected)
        fresh = recon.apply_plan(_mixer(), result.plan)
        fresh.load_state_dict(result.model.state_dict())
        assert torch.equal(fresh.eval()(HELD), expected)


def test_a_plan_names_a_producer_that_is_not_linear():
    result = _prune(_mixer(), keep_ratio=0.5)
    other = _mixer()
    other.fc1 = nn.Conv2d(8, 24, 1)
    with pytest.raises(ValueError, match="'fc1' is a Conv2d, expected a Linear"):
        recon.apply_plan(other, result.plan)


def test_convnext_reaches_its_flops_target_and_the_refit_helps():
    net = cifar_convnext(in_channels=3, cfg=((16, 1), (32, 1)))
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fit = recon.prune(net, x[:16], speedup=1.5, progress=False, allocation="uniform")
    none = recon.prune(
        net, x[:16], speedup=1.5, progress=False, allocation="uniform", reconstruct="none"
    )
    assert fit.report.speedup == pytest.approx(1.5, rel=0.02)
    with torch.no_grad():
        ref = net(x[16:])
        assert _rel(fit.model(x[16:]), ref) < _rel(none.model(x[16:]), ref)
    assert {r.kind for r in fit.report.layers} == {"tokens"}


@pytest.mark.parametrize("build", [_tv_vit, _tv_swin], ids=["vit", "swin"])
def test_torchvision_transformers_prune_and_keep_their_shapes(build):
    net = build()
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    result = recon.prune(net, x[:8], keep_ratio=0.5, progress=False, allocation="uniform")
    with torch.no_grad():
        assert result.model(x[8:]).shape == net(x[8:]).shape
    for name, k in result.channels.items():
        m = result.model.get_submodule(name)
        assert (m.out_features if isinstance(m, nn.Linear) else m.num_heads) == k


# --------------------------------------------------------------------------- heads


def test_the_heads_of_self_attention_are_a_unit():
    graph = find_units(_attender())
    assert [(u.name, u.consumer, u.consumer_kind, u.width, u.taps) for u in graph.units] == [
        ("attn", "attn.out_proj", "heads", 4, 4)
    ]
    vit = find_units(_tv_vit())
    heads = [u.name for u in vit.units if u.consumer_kind == "heads"]
    assert heads == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in (0, 1)]
    swin = find_units(_tv_swin())
    heads = [
        (u.name, u.consumer, u.width, u.taps) for u in swin.units if u.consumer_kind == "heads"
    ]
    assert heads == [("features.1.0.attn", "features.1.0.attn.proj", 2, 8),
                     ("features.3.0.attn", "features.3.0.attn.proj", 2, 16)]  # fmt: skip


def test_cross_attention_and_masks_are_not_units():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x + 1, x, need_weights=False)[0]

    graph = find_units(Cross())
    assert graph.units == [] and "not self-attention" in graph.skipped["attn"]


def test_attention_flops_are_counted_and_scale_with_the_heads():
    net = _attender()
    total, per = count_flops(net, X[:1])
    T, E = 16, 16  # 4x4 tokens
    assert per["attn"] == 2 * T * E * 3 * E + 2 * 2 * T * T * E + 2 * T * E * E
    result = _prune(net, channels={"attn": 2})
    assert isinstance(result.model.attn, HeadAttention) and result.model.attn.num_heads == 2
    assert count_flops(result.model, X[:1])[1]["attn"] == per["attn"] // 2
    assert result.report.flops_after == total - per["attn"] // 2


def test_keep_all_heads_reproduces_the_outputs():
    net = _attender()
    result = _prune(net, keep_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(result.model(HELD), net(HELD), rtol=1e-5, atol=1e-5)


def test_a_duplicated_head_is_found_and_removed_exactly():
    net = _attender()
    with torch.no_grad():  # head 3 computes what head 1 does: same q, k, v rows
        w, b = net.attn.in_proj_weight, net.attn.in_proj_bias
        for part in range(3):  # q, k, v
            w[part * 16 + 12 : part * 16 + 16] = w[part * 16 + 4 : part * 16 + 8]
            b[part * 16 + 12 : part * 16 + 16] = b[part * 16 + 4 : part * 16 + 8]
    result = _prune(net, channels={"attn": 3})
    assert set(range(4)) - set(result.kept["attn"]) in ({1}, {3})
    assert result.model.attn.out_proj.in_features == 12
    with torch.no_grad():  # the kept copy's output columns carry both heads
        assert _rel(result.model(HELD), net(HELD)) < 1e-9


@pytest.mark.parametrize("shift", [[0, 0], [1, 1]], ids=["windows", "shifted"])
def test_a_duplicated_swin_head_is_removed_exactly(shift):
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    class Swin(nn.Module):  # the window attention on a (B, H, W, C) map
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 2, 2)
            self.attn = ShiftedWindowAttention(16, [2, 2], shift, 4)
            self.head = nn.Linear(16, 5)

        def forward(self, x: Tensor) -> Tensor:
            t = self.stem(x).permute(0, 2, 3, 1)  # (B, 8, 8, 16)
            return self.head((t + self.attn(t)).mean((1, 2)))

    torch.manual_seed(0)
    net = Swin().eval()
    with torch.no_grad():  # head 2 is a copy of head 0, relative position bias included
        w, b = net.attn.qkv.weight, net.attn.qkv.bias
        for part in range(3):
            w[part * 16 + 8 : part * 16 + 12] = w[part * 16 : part * 16 + 4]
            b[part * 16 + 8 : part * 16 + 12] = b[part * 16 : part * 16 + 4]
        net.attn.relative_position_bias_table[:, 2] = net.attn.relative_position_bias_table[:, 0]
    keep_all = _prune(net, keep_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(keep_all.model(HELD), net(HELD), rtol=1e-5, atol=1e-5)
    result = _prune(net, channels={"attn": 3})
    assert set(range(4)) - set(result.kept["attn"]) in ({0}, {2})
    assert result.model.attn.proj.in_features == 12
    assert result.model.attn.relative_position_bias_table.shape[1] == 3
    with torch.no_grad():
        assert _rel(result.model(HELD), net(HELD)) < 1e-9


def test_swin_flops_scale_with_the_heads_where_windows_are_padded():
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    from recon.layers import WindowHeadAttention

    torch.manual_seed(0)
    attn = ShiftedWindowAttention(16, [3, 3], [1, 1], 4).eval()  # 8x8 tokens: padded to 9x9
    x = torch.randn(1, 8, 8, 16)
    small = WindowHeadAttention.from_swin(attn, [1, 2, 3]).eval()
    before = count_flops(nn.Sequential(attn), x)[0]
    assert count_flops(nn.Sequential(small), x)[0] * 4 == before * 3
    with torch.no_grad():  # and all heads kept: torchvision's output
        full = WindowHeadAttention.from_swin(attn, [0, 1, 2, 3]).eval()
        torch.testing.assert_close(full(x), attn(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["obs", "lasso", "thinet", "l1", "random"])
def test_heads_are_chosen_by_every_method_and_refitted(method):
    net = _attender()
    fit = _prune(net, channels={"attn": 2}, method=method)
    none = _prune(net, channels={"attn": 2}, method=method, reconstruct="none")
    assert method == "obs" or fit.kept == none.kept  # obs chooses on the re-fitted error
    with torch.no_grad():
        ref = net(HELD)
        assert _rel(fit.model(HELD), ref) < _rel(none.model(HELD), ref)


def test_heads_save_load_and_apply_plan(tmp_path):
    result = _prune(_attender(), channels={"attn": 2}, allocation="uniform")
    path = tmp_path / "attn.recon"
    recon.save(result, path)
    with torch.no_grad():
        expected = result.model(HELD)
        assert torch.equal(recon.load(path, _attender).eval()(HELD), expected)
        fresh = recon.apply_plan(_attender(), result.plan)
        fresh.load_state_dict(result.model.state_dict())
        assert torch.equal(fresh.eval()(HELD), expected)
    other = _attender()
    other.attn = nn.MultiheadAttention(16, 2, batch_first=True)
    with pytest.raises(ValueError, match="'attn' has 2 heads of 8 features, not 4 of 4"):
        recon.apply_plan(other, result.plan)


def test_a_vit_reaches_its_target_with_heads_and_mlps_and_the_refit_helps():
    net = _tv_vit()
    x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    kw = {"speedup": 1.5, "progress": False, "allocation": "uniform"}
    fit, none = recon.prune(net, x[:16], **kw), recon.prune(net, x[:16], reconstruct="none", **kw)
    assert fit.report.speedup == pytest.approx(1.5, rel=0.02)
    assert {r.kind for r in fit.report.layers} == {"heads", "tokens"}
    with torch.no_grad():
        ref = net(x[16:])
        assert _rel(fit.model(x[16:]), ref) < _rel(none.model(x[16:]), ref)


# --------------------------------------------------------------------------- processes


def _rank_mixer(rank: int, world: int) -> dict:
    out = {}
    for name, build in (("mixer", _mixer), ("attender", _attender)):
        res = recon.prune(build(), CALIB, keep_ratio=0.5, progress=False, allocation="uniform")
        out[name] = {"kept": res.kept, "out": res.model(HELD).detach()}
    return out


@pytest.mark.slow  # process start-up
def test_two_ranks_give_the_one_process_model():
    from _compare import assert_same_outputs
    from _dist import run_ranks, values

    ranks = values(run_ranks(_rank_mixer, timeout=240))
    for name, build in (("mixer", _mixer), ("attender", _attender)):
        single = _prune(build(), keep_ratio=0.5)
        assert ranks[0][name]["kept"] == ranks[1][name]["kept"] == single.kept
        assert torch.equal(ranks[0][name]["out"], ranks[1][name]["out"])
        with torch.no_grad():
            assert_same_outputs(ranks[0][name]["out"], single.model(HELD))


def test_auto_allocation_and_recovery_cover_the_mlp():
    net = _mixer()
    result = _prune(net, speedup=1.3, allocation="auto")
    assert [row.name for row in result.report.allocation.rows] == ["fc1"]
    # recovery matches fc1's kept features, along the last dimension of its output
    from recon._plan import plan_of
    from recon.recovery import channel_points, matched_points

    channels = channel_points(plan_of(result.model), net)
    points = matched_points(result.model, net, HELD[:2], channels)
    dim, index = points["fc1"]
    assert dim == 2 and index.tolist() == result.kept["fc1"]
    rec = recon.recover(result, net, CALIB, steps=10, progress=False)
    assert rec.report.points >= 1 and rec.report.error_after <= rec.report.error_before


def test_bench_counts_the_statistics_of_heads_and_mlps():
    from recon.bench import work

    # attention: 4 heads x 4 features, 16 outputs, 10 of 16 tokens sampled per image
    assert work(_attender(), X[:4], images=4, samples_per_image=10)[1] == 40 * (136 + 256)
    # the MLP: 24 features, 8 outputs
    assert work(_mixer(), X[:4], images=4, samples_per_image=10)[1] == 40 * (300 + 192)
