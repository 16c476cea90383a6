"""Iterative pruning: K rounds reach the target, compose into a loadable plan, resume."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from nets import bright_pixels, quiet_prune

import recon
import recon.iterative as iterative
from recon.budget import count_flops
from recon.finetune import finetune
from recon.models import digits_resnet20, digits_vgg


@pytest.fixture(scope="module")
def trained():
    """A small VGG that learned the bright-pixel problem, and its data."""
    x, y = bright_pixels(256)
    torch.manual_seed(0)
    net = digits_vgg(width=0.5)
    finetune(net, x, y, steps=60, lr=0.05, batch_size=32, augment=False, progress=False)
    return net.eval(), x, y


def _run(net, x, y, **kwargs):
    kwargs = {"speedup": 2.0, "rounds": 3, "finetune_steps": 6, "progress": False} | kwargs
    kwargs.setdefault("prune_options", {"allocation": "uniform"})
    kwargs.setdefault("finetune_options", {"batch_size": 32})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="re-fitting", category=UserWarning)
        return recon.iterative_prune(net, x[:128], (x, y), **kwargs)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("allocation", ["uniform", "auto"])
def test_rounds_reach_each_geometric_target_within_2_percent(trained, allocation):
    net, x, y = trained
    out = _run(net, x, y, prune_options={"allocation": allocation})
    assert [r.index for r in out.rounds] == [1, 2, 3]
    for r in out.rounds:  # each round against the *original* FLOPs
        assert r.target == pytest.approx(2.0 ** (r.index / 3))
        assert abs(r.speedup / r.target - 1) <= 0.02
    assert abs(out.speedup / 2.0 - 1) <= 0.02
    assert [r.finetune_steps for r in out.rounds] == [2, 2, 2]
    assert not out.model.training


def test_rounds_compose_into_the_architecture_a_one_shot_plan_loads(trained, tmp_path):
    net, x, y = trained
    out = _run(net, x, y)
    # the composed plan rebuilds the final model from the unpruned architecture ...
    path = tmp_path / "iterative.pt"
    recon.save(out.model, path)
    loaded = recon.load(path, lambda: digits_vgg(width=0.5)).eval()
    assert _same(loaded, out.model)
    assert torch.equal(loaded(x[:8]), out.model(x[:8]))
    assert len(out.plan["history"]) == 2  # three runs: two earlier ones composed
    # ... and it is the architecture a one-shot plan with the same channels loads
    one = quiet_prune(net, x[:128], channels=out.rounds[-1].channels)
    fresh = recon.apply_plan(digits_vgg(width=0.5), one.plan)
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    assert shapes == {k: v.shape for k, v in loaded.state_dict().items()}


def test_one_round_is_one_shot_then_fine_tuning(trained):
    net, x, y = trained
    out = _run(net, x, y, rounds=1, finetune_steps=4, seed=3)
    one = quiet_prune(net, x[:128], speedup=2.0, allocation="uniform", seed=3)
    finetune(one.model, x, y, steps=4, batch_size=32, seed=3, progress=False)
    assert _same(out.model, one.model)


def test_steps_are_shared_and_zero_means_no_fine_tuning(trained):
    assert iterative._split_steps(7, 3) == [2, 2, 3]
    net, x, y = trained
    out = _run(net, x, y, rounds=2, finetune_steps=0)
    assert [r.finetune_steps for r in out.rounds] == [0, 0]
    assert out.rounds[-1].report is not None


def test_an_interrupted_run_resumes_to_the_uninterrupted_model(trained, tmp_path, monkeypatch):
    net, x, y = trained
    whole = _run(net, x, y, checkpoint=tmp_path / "whole.pt")
    calls = {"n": 0}
    real = iterative.finetune

    def dies_in_round_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(iterative, "finetune", dies_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        _run(net, x, y, checkpoint=tmp_path / "state.pt")
    monkeypatch.setattr(iterative, "finetune", real)
    resumed = _run(net, x, y, checkpoint=tmp_path / "state.pt")
    assert [r.index for r in resumed.rounds] == [1, 2, 3]
    assert resumed.rounds[0].report is None  # restored from the file, not pruned again
    assert _same(resumed.model, whole.model)
    assert resumed.plan["units"] == whole.plan["units"]
    with pytest.raises(ValueError, match="rounds"):  # a file of another run is refused
        _run(net, x, y, rounds=2, checkpoint=tmp_path / "state.pt")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"speedup": 1.0}, ValueError, r"'speedup' argument must be a finite float > 1\. Got 1\.0"),
        ({"speedup": "2"}, ValueError, "'speedup'"),
        ({"rounds": 0}, ValueError, r"'rounds' argument must be an int >= 1\. Got 0"),
        ({"rounds": 2.0}, ValueError, "'rounds'"),
        ({"finetune_steps": -1}, ValueError, "'finetune_steps' argument must be an int >= 0"),
        ({"prune_options": {"speedup": 3.0}}, ValueError, "'prune_options'.*'speedup'"),
        ({"prune_options": [1]}, TypeError, "'prune_options' argument must be a dict"),
        ({"finetune_options": {"steps": 3}}, ValueError, "'finetune_options'.*'steps'"),
    ],
)
def test_bad_arguments_name_argument_expected_and_got(trained, kwargs, error, match):
    net, x, y = trained
    with pytest.raises(error, match=match):
        _run(net, x, y, **kwargs)


def test_bad_data_and_pruned_model_with_checkpoint(trained, tmp_path):
    net, x, y = trained
    with pytest.raises(TypeError, match="'train' argument must be a tuple"):
        recon.iterative_prune(net, x, x, speedup=2.0, rounds=2, finetune_steps=2)
    with pytest.raises(ValueError, match="'train' argument must be"):
        recon.iterative_prune(net, x, (x, y.float()), speedup=2.0, rounds=2, finetune_steps=2)
    with pytest.raises(TypeError, match="'model'"):
        recon.iterative_prune("net", x, (x, y), speedup=2.0, rounds=2, finetune_steps=2)
    pruned = quiet_prune(net, x[:128], keep_ratio=0.75).model
    with pytest.raises(ValueError, match=r"'checkpoint'.*no recon plan"):
        _run(pruned, x, y, checkpoint=tmp_path / "s.pt")


def test_public_names_are_served_on_first_use():
    """``import recon`` does not load fine-tuning; the names load their module on use."""
    code = (
        "import sys, recon\n"
        "before = 'recon.finetune' in sys.modules or 'recon.iterative' in sys.modules\n"
        "f, s = recon.iterative_prune, recon.sensitivity_scan\n"
        "print(before, f.__module__, s.__module__, 'iterative_prune' in dir(recon))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "recon.iterative", "recon.scan", "True"]


def test_a_pruned_resnet_pruned_again_meets_its_target():
    """The convs behind sampler layers count in the per-module FLOPs, so a second
    round on a ResNet (whose first round put samplers in) is asked the right speed-up."""
    net = digits_resnet20(width=0.5).eval()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1)
    once = quiet_prune(net, x, speedup=1.4, allocation="uniform").model
    total, per_module = count_flops(once, x[:1])
    assert sum(per_module.values()) == total and "layer1.0.conv1" in per_module
    out = _run(net, x, y, speedup=2.0, rounds=2, finetune_steps=2)
    for r in out.rounds:
        assert abs(r.speedup / r.target - 1) <= 0.02
