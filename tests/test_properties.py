"""Property tests of ``recon.prune`` over small random chains and residual blocks.

For any small network, method, re-fitting mode and channel counts: exactly the
requested channels are kept, the output shape is preserved, keeping every channel is
the identity, the caller's model is never changed, the same seed gives bit-identical
results on CPU, and save/load reproduces the pruned model exactly.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import randomize_bn
from torch import nn

import recon
from recon import models
from recon.graph import find_units
from recon.select import METHODS
from recon.solve import RECONSTRUCT

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@st.composite
def networks(draw) -> tuple[nn.Module, torch.Tensor, callable]:
    """A small VGG-like chain or CIFAR-style ResNet, calibration data, and its builder."""
    seed = draw(st.integers(0, 2**16))
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=3))
        pools = draw(st.lists(st.booleans(), min_size=len(widths), max_size=len(widths)))
        cfg: list[int | str] = []
        for w, pool in zip(widths, pools, strict=True):
            cfg += [w, "M"] if pool and cfg.count("M") < 2 else [w]
        batch_norm = draw(st.booleans())

        def build() -> nn.Module:
            torch.manual_seed(seed)
            net = models.VGG(cfg, batch_norm=batch_norm, input_size=8, num_classes=3)
            return randomize_bn(net, seed).eval()

    else:
        blocks = draw(st.lists(st.integers(1, 2), min_size=1, max_size=2))
        widths = draw(st.lists(st.integers(2, 6), min_size=len(blocks), max_size=len(blocks)))

        def build() -> nn.Module:
            torch.manual_seed(seed)
            net = models.CifarResNet(blocks, widths=widths, num_classes=3)
            return randomize_bn(net, seed).eval()

    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return build(), x, build


def _prune(model: nn.Module, x: torch.Tensor, **kwargs) -> recon.PruneResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # under-determined fits on tiny data
        return recon.prune(model, x, progress=False, **kwargs)


def _counts(data, model: nn.Module) -> dict[str, int]:
    return {
        u.name: data.draw(st.integers(1, u.width), label=u.name) for u in find_units(model).units
    }


@SETTINGS
@given(
    net=networks(),
    method=st.sampled_from(METHODS),
    reconstruct=st.sampled_from(RECONSTRUCT),
    data=st.data(),
)
def test_keeps_exactly_the_requested_channels(net, method, reconstruct, data):
    model, x, _ = net
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    counts = _counts(data, model)
    result = _prune(model, x, channels=counts, method=method, reconstruct=reconstruct)
    assert result.channels == counts
    for name, kept in result.kept.items():
        assert len(kept) == counts[name] == len(set(kept)), name
        assert (
            kept == sorted(kept) and 0 <= kept[0] and kept[-1] < find_units(model).unit(name).width
        )
    assert result.model(x).shape == model(x).shape
    assert torch.isfinite(result.model(x)).all()
    # The caller's model is never changed: weights, buffers, modes.
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: m.training for n, m in model.named_modules()} == modes


@SETTINGS
@given(net=networks(), method=st.sampled_from(METHODS), reconstruct=st.sampled_from(RECONSTRUCT))
def test_keeping_every_channel_is_the_identity(net, method, reconstruct):
    model, x, build = net
    full = {u.name: u.width for u in find_units(model).units}
    result = _prune(model, x, channels=full, method=method, reconstruct=reconstruct)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)
    reshaped = recon.apply_plan(build(), result.plan)
    with torch.no_grad():
        assert torch.equal(reshaped(x), model(x))


@SETTINGS
@given(net=networks(), method=st.sampled_from(METHODS), seed=st.integers(0, 100), data=st.data())
def test_same_seed_is_bit_identical(net, method, seed, data):
    model, x, _ = net
    counts = _counts(data, model)
    a = _prune(model, x, channels=counts, method=method, seed=seed)
    b = _prune(model, x, channels=counts, method=method, seed=seed)
    assert a.kept == b.kept
    assert a.plan == b.plan
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@SETTINGS
@given(net=networks(), ratio=st.sampled_from([0.3, 0.5, 0.8]), again=st.booleans())
def test_save_load_reproduces_the_pruned_model(net, ratio, again):
    model, x, build = net
    result = _prune(model, x, keep_ratio=ratio)
    if again:  # a pruned model pruned again: the plan composes
        result = _prune(result.model, x, keep_ratio=0.5)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt")
        recon.save(result, path)
        loaded = recon.load(path, build).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
