"""Fine-tuning under DistributedDataParallel, on two gloo ranks in spawned processes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from _compare import relative_difference
from _dist import run_ranks, values
from nets import bright_pixels

from recon.finetune import finetune
from recon.models import DIGITS_VGG_CFG, VGG, digits_vgg

# the same arguments on every rank and in the single-process reference; 64 images in
# batches of 15 (not a multiple of 2): 4 batches a pass, so 6 steps start a second pass
ARGS = {"steps": 6, "lr": 0.05, "batch_size": 15, "augment": True, "seed": 3, "progress": False}


def _problem(n: int = 64):
    return bright_pixels(n)


def _plain_net() -> VGG:
    torch.manual_seed(0)
    return VGG(DIGITS_VGG_CFG, in_channels=1, batch_norm=False, width=0.25, input_size=8)


def _bn_net() -> VGG:
    torch.manual_seed(0)
    return digits_vgg(width=0.25)


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _state(model) -> dict[str, np.ndarray]:
    """The state dict as numpy arrays: tensors sent between processes must outlive them."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _tensors(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in state.items()}


# ----------------------------------------------------------------- run on every rank


def _tune_plain(rank: int, world: int):
    x, y = _problem()
    net = _plain_net()
    out = finetune(net, x, y, **ARGS)
    assert out is net and not net.training
    # the wrapper and its gradient hooks are gone: a backward on one rank alone returns
    if rank == 0:
        F.cross_entropy(net(x), y).backward()
    return _state(net)


def _tune_bn(rank: int, world: int):
    x, y = _problem()
    net = _bn_net()
    before = _loss(net.eval(), x, y)
    out = finetune(net, x, y, **ARGS)
    return _state(out), out.training, before, _loss(out, x, y)


def _too_small(rank: int, world: int):
    x, y = _problem()
    messages = []
    for xs, ys, batch_size in ((x, y, world - 1), (x[:1], y[:1], world)):
        try:
            finetune(_plain_net(), xs, ys, steps=1, batch_size=batch_size, progress=False)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def _tune_checkpointed(rank: int, world: int, path: str, fail_at: int | None):
    """Train with a checkpoint; with ``fail_at``, every rank dies in that step's forward."""
    x, y = _problem()
    net = _plain_net()
    if fail_at is not None:
        calls = [0]

        def die(module, inputs):
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError("interrupted")

        net.register_forward_pre_hook(die)
    finetune(net, x, y, checkpoint=path, checkpoint_every=2, **ARGS)
    return _state(net)


# ----------------------------------------------------------------- tests


def test_ddp_matches_one_process_without_batch_norm():
    states = [_tensors(s) for s in values(run_ranks(_tune_plain, world=2))]
    x, y = _problem()
    reference = _tensors(_state(finetune(_plain_net(), x, y, **ARGS)))
    initial = _plain_net().state_dict()
    assert not torch.allclose(
        reference["classifier.weight"], initial["classifier.weight"], atol=1e-3
    )
    # DDP sums the halves' gradients in another order than one process does, so compare
    # what training changed, relative to its size: measured up to 3e-4 (a feature bias
    # that moved by 1e-3), where a gradient scaled wrongly would be off by 50 %
    for state in states:
        assert state.keys() == reference.keys()
        for name, value in reference.items():
            rel = relative_difference(state[name] - initial[name], value - initial[name])
            assert rel <= 1e-2, f"{name}: its update differs by {rel:.1e} relative"


def test_ddp_with_batch_norm_keeps_ranks_identical_and_learns():
    (s0, training0, before, after), (s1, training1, _, _) = values(run_ranks(_tune_bn, world=2))
    s0, s1 = _tensors(s0), _tensors(s1)
    assert not training0 and not training1
    assert s0.keys() == s1.keys()
    for name in s0:
        assert torch.equal(s0[name], s1[name]), name  # running statistics included
    assert s0["features.1.num_batches_tracked"] == ARGS["steps"]
    assert after < before


def test_ddp_needs_an_image_per_rank_in_every_batch():
    for messages in values(run_ranks(_too_small, world=2)):
        assert len(messages) == 2
        assert "'batch_size'" in messages[0] and "Got 1 instead" in messages[0]
        assert "'x'" in messages[1]


def test_two_ranks_resume_from_rank_zeros_checkpoint(tmp_path):
    path = str(tmp_path / "run.pt")
    whole = values(run_ranks(_tune_checkpointed, str(tmp_path / "whole.pt"), None))
    died = run_ranks(_tune_checkpointed, path, 5)
    assert all(r.status == "error" and "interrupted" in r.value for r in died)
    assert torch.load(path, weights_only=True)["step"] == 4  # rank 0 saved after step 4
    resumed = values(run_ranks(_tune_checkpointed, path, None))
    for state in resumed:  # each rank ends as the uninterrupted run's ranks did
        for key, value in whole[0].items():
            assert np.array_equal(state[key], value), key
