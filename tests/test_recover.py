"""Label-free recovery (recon.recover): known answers, the held-out guard, no labels,
save/load, reports and bad arguments. Two gloo ranks: test_recover_dist.py."""

from __future__ import annotations

import pytest
import torch
from nets import quiet_prune
from torch import nn

import recon
from recon.models import cifar_resnet
from recon.recovery import matched_points


def _pair(noise: float = 0.3):
    """An original whose conv1 channels 2, 3 duplicate 0, 1, and a 2-channel copy whose
    conv2 reads the sums (the exact solution) plus ``noise``: recovery's known answer."""
    torch.manual_seed(0)
    original = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5),
    )  # fmt: skip
    with torch.no_grad():
        original[0].weight[2:] = original[0].weight[:2]
        original[0].bias[2:] = original[0].bias[:2]
    pruned = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5),
    )  # fmt: skip
    with torch.no_grad():
        pruned[0].weight.copy_(original[0].weight[:2])
        pruned[0].bias.copy_(original[0].bias[:2])
        w = original[2].weight
        g = torch.Generator().manual_seed(1)
        pruned[2].weight.copy_(w[:, :2] + w[:, 2:] + noise * torch.randn(6, 2, 3, 3, generator=g))
        pruned[2].bias.copy_(original[2].bias)
        pruned[6].load_state_dict(original[6].state_dict())
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    return original.eval(), pruned.eval(), x


def _error(a: nn.Module, b: nn.Module, x) -> float:
    with torch.no_grad():
        ya, yb = a(x).double(), b(x).double()
    return float((ya - yb).square().sum() / yb.square().sum())


def test_recovery_finds_the_exact_solution_of_a_duplicate_channel_net():
    original, pruned, x = _pair()
    before = [p.detach().clone() for p in pruned.parameters()]
    out = recon.recover(pruned, original, x, steps=300, lr=3e-3, augment=False, progress=False)
    for p, q in zip(pruned.parameters(), before, strict=True):
        assert torch.equal(p, q)  # the caller's model is left as it was
    rep = out.report
    assert rep.accepted and rep.best_step > 0
    assert rep.error_before > 0.01
    assert rep.error_after < 0.02 * rep.error_before  # back to the original's outputs
    fresh = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    assert _error(out.model, original, fresh) < 0.05 * _error(pruned, original, fresh)
    assert not out.model.training and out.result is None
    assert rep.images + rep.heldout_images == len(x) and rep.heldout_images == 24


def test_a_run_that_never_improves_the_held_out_error_returns_the_one_shot_weights():
    """The guard: a learning rate that wrecks every step leaves the one-shot model."""
    original, pruned, x = _pair()
    out = recon.recover(pruned, original, x[:8], steps=6, lr=50.0, eval_every=1, progress=False)
    assert not out.report.accepted and out.report.best_step == 0
    assert out.report.error_after == out.report.error_before
    for a, b in zip(out.model.state_dict().values(), pruned.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class _Poison:
    """A label that fails the test if recover reads it in any way."""

    def __getattribute__(self, name):
        raise AssertionError(f"recover read a label ({name})")


def test_no_label_is_ever_read():
    original, pruned, x = _pair()
    kw = {"steps": 20, "progress": False}
    plain = recon.recover(pruned, original, x, **kw)
    batches = [(xb, _Poison()) for xb in x.split(32)]
    labelled = recon.recover(pruned, original, batches, **kw)
    for a, b in zip(plain.model.parameters(), labelled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _resnet():
    torch.manual_seed(0)
    return cifar_resnet(8, width=0.5, in_channels=1, num_classes=4).eval()


def test_a_prune_result_gains_the_recover_report_and_phase(tmp_path):
    net = _resnet()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = quiet_prune(net, x, speedup=2.0, allocation="uniform")
    out = recon.recover(result, net, x, steps=30, progress=False)
    assert out.result is not result and out.result.model is out.model
    assert out.result.plan == result.plan and result.report.recover is None
    rep = out.result.report
    assert rep.recover == out.report and rep.phases["recover"] == out.report.seconds
    assert "recovery" in str(rep) and "held-out output error" in str(rep)
    assert recon.Report.from_json(rep.to_json()) == rep
    assert out.report.points >= 1  # the residual blocks' outputs keep their shape
    # the recovered result saves and loads like the one-shot one
    path = tmp_path / "recovered.pt"
    recon.save(out.result, path)
    loaded = recon.load(path, _resnet).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out.model(x))


def test_recovery_of_a_loaded_model_equals_recovery_of_the_result(tmp_path):
    net = _resnet()
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = quiet_prune(net, x, speedup=2.0, allocation="uniform")
    path = tmp_path / "pruned.pt"
    recon.save(result, path)
    loaded = recon.load(path, _resnet).eval()
    a = recon.recover(result, net, x, steps=15, progress=False)
    b = recon.recover(loaded, net, x, steps=15, progress=False)
    assert a.report.best_step == b.report.best_step
    with torch.no_grad():
        torch.testing.assert_close(a.model(x), b.model(x), rtol=1e-4, atol=1e-5)


def test_matched_points_are_the_blocks_whose_outputs_keep_their_shape():
    net = _resnet()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pruned = quiet_prune(net, x, speedup=2.0, allocation="uniform").model
    points = matched_points(pruned, net, x[:2])
    names = dict(net.named_modules())
    blocks = [n for n, m in names.items() if type(m).__name__ == "BasicBlock"]
    assert blocks and set(blocks) <= set(points)  # the residual stream keeps its shape
    assert set(points) - set(blocks) <= {n for n in names if n.endswith("downsample")}
    # the stage containers return their last block's tensor: the block is kept, not both
    assert not any(p.count(".") == 0 for p in points)


def test_blockwise_mode_trains_stage_by_stage_and_keeps_the_guard():
    net = _resnet()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = quiet_prune(net, x, speedup=2.0, allocation="uniform")
    out = recon.recover(result, net, x, steps=20, mode="blockwise", progress=False)
    assert out.report.mode == "blockwise"
    assert out.report.error_after <= out.report.error_before


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": -1}, ValueError, "'steps'"),
        ({"steps": 2.5}, TypeError, "'steps'"),
        ({"mode": "magic"}, ValueError, "'mode'"),
        ({"lr": 0}, ValueError, "'lr'"),
        ({"holdout": 1.0}, ValueError, "'holdout'"),
        ({"batch_size": 0}, ValueError, "'batch_size'"),
        ({"eval_every": 0}, ValueError, "'eval_every'"),
        ({"augment": "yes"}, TypeError, "'augment'"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match):
    original, pruned, x = _pair()
    with pytest.raises(error, match=match):
        recon.recover(pruned, original, x, progress=False, **kwargs)


def test_bad_models_and_data_are_refused():
    original, pruned, x = _pair()
    with pytest.raises(TypeError, match=r"'pruned' argument must be an nn\.Module or a"):
        recon.recover("model.pt", original, x)
    with pytest.raises(TypeError, match="'original'"):
        recon.recover(pruned, None, x)
    with pytest.raises(ValueError, match="at least 2 images"):
        recon.recover(pruned, original, x[:1])


def test_pruned_layers_are_compared_on_the_channels_they_kept():
    """A VGG has no block whose output keeps its shape: its points are the pruned layers'
    BatchNorms, the original's outputs taken at the plan's kept channels."""
    from recon._plan import plan_of
    from recon.models import digits_vgg
    from recon.recovery import channel_points

    torch.manual_seed(0)
    net = digits_vgg(width=0.25).eval()
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = quiet_prune(net, x, speedup=2.0, allocation="uniform")
    channels = channel_points(plan_of(result.model), net)
    assert channels and all(name in dict(net.named_modules()) for name in channels)
    points = matched_points(result.model, net, x[:2], channels)
    assert points and all(idx is not None for idx in points.values())
    small, big = dict(result.model.named_modules()), dict(net.named_modules())
    for name, (dim, idx) in points.items():
        assert type(big[name]).__name__ == "BatchNorm2d" and dim == 1
        assert len(idx) == small[name].num_features < big[name].num_features
        # the pruned network's first BatchNorm is the original's at the kept channels
    first = next(iter(points))
    a, b = {}, {}
    from recon.recovery import _taps

    with torch.no_grad(), _taps(net, [first], a), _taps(result.model, [first], b):
        net(x[:4])
        result.model(x[:4])
    torch.testing.assert_close(b[first], a[first][:, points[first][1]])
    # a teacher of other widths than the plan's network gives no channel points
    assert channel_points(plan_of(result.model), digits_vgg(width=0.5)) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_recovery_matches_the_cpu_run():
    """The same recovery on a GPU: the same best step, outputs to float32 round-off."""
    original, pruned, x = _pair()
    kw = {"steps": 40, "lr": 3e-3, "progress": False}
    cpu = recon.recover(pruned, original, x, **kw)
    gpu = recon.recover(pruned.cuda(), original.cuda(), x.cuda(), **kw)
    assert gpu.report.best_step == cpu.report.best_step
    assert next(gpu.model.parameters()).is_cuda
    with torch.no_grad():
        torch.testing.assert_close(gpu.model(x.cuda()).cpu(), cpu.model(x), rtol=1e-3, atol=1e-4)
