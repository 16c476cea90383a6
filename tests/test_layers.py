"""The sampler layer and the sampled convolution, against plain ``F.conv2d`` on sliced input.

Outputs are compared with ``assert_close``'s float32 defaults (rtol 1.3e-6, atol 1e-5):
a convolution may pick another kernel, summing in another order, for a sliced or
differently laid-out input; a wrong channel or tap is off by ~0.1.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recon.graph import trace
from recon.layers import SampledConv2d, Sampler


def make_conv(c: int = 5, n: int = 4, k: int = 3, *, seed: int = 0, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)  # the conftest fixture restores the global RNG state
    return nn.Conv2d(c, n, k, **kwargs)


def inputs(c: int = 5, *, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c, 9, 9, generator=g, dtype=dtype)


def reference(conv: nn.Conv2d, x: torch.Tensor, index, weight=None) -> torch.Tensor:
    """``conv`` applied to ``x[:, index]`` with the weight sliced the same way."""
    w = conv.weight[:, index] if weight is None else weight
    return F.conv2d(x[:, index], w, conv.bias, conv.stride, conv.padding, conv.dilation)


# --- Sampler --------------------------------------------------------------------------------


def test_sampler_selects_channels_in_order():
    x = torch.arange(8.0).view(2, 4, 1, 1)  # sample 0: channels 0..3, sample 1: 4..7
    s = Sampler([3, 0, 2], in_channels=4)
    y = s(x)
    assert y.shape == (2, 3, 1, 1)
    assert y.flatten().tolist() == [3.0, 0.0, 2.0, 7.0, 4.0, 6.0]
    assert s.index.dtype == torch.int64
    assert s.index.tolist() == [3, 0, 2]
    assert s.in_channels == 4


def test_sampler_accepts_a_tensor_index_and_keeps_spatial_values():
    x = inputs(6)
    s = Sampler(torch.tensor([5, 1]), in_channels=6)
    assert torch.equal(s(x), x[:, [5, 1]])


def test_sampler_extra_repr():
    s = Sampler([1, 2], in_channels=5)
    assert s.extra_repr() == "2 of 5 channels"
    assert repr(s) == "Sampler(2 of 5 channels)"


@pytest.mark.parametrize("index", [[], [0, 2, 0], [-1, 1], [1, 4], [7]])
def test_sampler_bad_index_raises_naming_index(index):
    with pytest.raises(ValueError, match="'index'"):
        Sampler(index, in_channels=4)


# --- SampledConv2d.from_conv ----------------------------------------------------------------


CONV_VARIANTS = [
    dict(stride=1, padding=0, dilation=1, bias=True),
    dict(stride=2, padding=1, dilation=1, bias=False),
    dict(stride=1, padding=1, dilation=2, bias=True),
    dict(stride=2, padding=0, dilation=2, bias=False),
    dict(stride=1, padding=1, dilation=1, bias=True),
]


@pytest.mark.parametrize("kwargs", CONV_VARIANTS, ids=lambda d: "-".join(map(str, d.values())))
@pytest.mark.parametrize("index", [[4, 1, 3], [2], [0, 1, 2, 3, 4][::-1]])
def test_from_conv_equals_conv_on_sliced_input(kwargs, index):
    conv = make_conv(**kwargs)
    x = inputs()
    layer = SampledConv2d.from_conv(conv, index)
    assert isinstance(layer, SampledConv2d)
    assert layer.in_channels == len(index)
    assert layer.sampler.in_channels == 5
    assert layer.sampler.index.tolist() == index
    assert (layer.stride, layer.padding, layer.dilation) == (
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    assert (layer.bias is None) == (conv.bias is None)
    assert layer.weight.shape == (4, len(index), 3, 3)
    torch.testing.assert_close(layer(x), reference(conv, x, index))


def test_from_conv_keeps_padding_mode():
    conv = make_conv(padding=1, padding_mode="reflect")
    x, index = inputs(), [3, 0]
    layer = SampledConv2d.from_conv(conv, index)
    assert layer.padding_mode == "reflect"
    padded = F.pad(x[:, index], (1, 1, 1, 1), mode="reflect")
    expected = F.conv2d(padded, conv.weight[:, index], conv.bias)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kwargs", CONV_VARIANTS[:3], ids=lambda d: "-".join(map(str, d.values())))
def test_from_conv_identity_index_equals_original(kwargs):
    conv = make_conv(**kwargs)
    x = inputs()
    layer = SampledConv2d.from_conv(conv, list(range(5)))
    assert torch.equal(layer.weight, conv.weight)
    torch.testing.assert_close(layer(x), conv(x))


def test_from_conv_weight_replaces_sliced_weight():
    conv = make_conv()
    x, index = inputs(), [4, 0]
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    layer = SampledConv2d.from_conv(conv, index, weight=w)
    assert torch.equal(layer.weight, w)
    assert layer.weight.data_ptr() != w.data_ptr()  # a copy, not the caller's tensor
    assert torch.equal(layer.bias, conv.bias)
    torch.testing.assert_close(layer(x), reference(conv, x, index, w))
    flat = SampledConv2d.from_conv(conv, index, weight=w.reshape(4, -1))  # (n, c*kh*kw)
    assert torch.equal(flat.weight, w)


def test_from_conv_composes_with_an_existing_sampler():
    conv = make_conv()
    x = inputs()
    outer = SampledConv2d.from_conv(conv, [0, 2, 3])
    inner = SampledConv2d.from_conv(outer, [2, 0])  # outer's inputs 2, 0 = original 3, 0
    assert inner.sampler.index.tolist() == [3, 0]
    assert inner.sampler.in_channels == 5  # still reads the original width
    assert inner.in_channels == 2
    assert torch.equal(inner.weight, conv.weight[:, [3, 0]])
    torch.testing.assert_close(inner(x), reference(conv, x, [3, 0]))
    assert outer.sampler.index.tolist() == [0, 2, 3]  # the input layer is not changed


def test_from_conv_does_not_modify_the_original():
    conv = make_conv(stride=2, padding=1)
    before = copy.deepcopy(conv.state_dict())
    attrs = (conv.in_channels, conv.out_channels, conv.stride, conv.padding, conv.training)
    params = (conv.weight, conv.bias)
    layer = SampledConv2d.from_conv(conv, [1, 3])
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.bias.add_(1.0)
    assert type(conv) is nn.Conv2d
    assert (conv.weight, conv.bias) == params  # same Parameter objects
    assert (conv.in_channels, conv.out_channels, conv.stride, conv.padding, conv.training) == attrs
    assert all(torch.equal(v, before[n]) for n, v in conv.state_dict().items())
    assert not hasattr(conv, "sampler")


@pytest.mark.parametrize("training", [True, False])
def test_from_conv_copies_training_mode_and_requires_grad(training):
    conv = make_conv().train(training)
    conv.bias.requires_grad_(False)
    layer = SampledConv2d.from_conv(conv, [0, 1])
    assert layer.training is training
    assert layer.sampler.training is training
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_from_conv_float64():
    conv = make_conv(padding=1).double()
    x, index = inputs(dtype=torch.float64), [2, 4, 1]
    layer = SampledConv2d.from_conv(conv, index)
    assert layer.weight.dtype == layer.bias.dtype == torch.float64
    out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(conv, x, index), rtol=1e-12, atol=1e-12)


def test_from_conv_rejects_grouped_and_non_conv():
    with pytest.raises(TypeError, match="'conv'"):
        SampledConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), [0, 1])
    with pytest.raises(TypeError, match="'conv'"):
        SampledConv2d.from_conv(nn.Linear(4, 4), [0, 1])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the empty index
@pytest.mark.parametrize("index", [[], [1, 1], [-1], [5]])
def test_from_conv_bad_index_raises_naming_index(index):
    with pytest.raises(ValueError, match="'index'"):
        SampledConv2d.from_conv(make_conv(), index)


@pytest.mark.parametrize("index", [[-1], [3]])
def test_from_conv_bad_index_on_sampled_conv_raises_naming_index(index):
    outer = SampledConv2d.from_conv(make_conv(), [0, 2, 4])
    with pytest.raises(ValueError, match="'index'"):
        SampledConv2d.from_conv(outer, index)


# --- constructor, state_dict, copies ----------------------------------------------------------


def test_constructor_defaults_to_identity_sampler():
    layer = SampledConv2d(3, 2, 1)
    assert layer.sampler.index.tolist() == [0, 1, 2]
    assert layer.sampler.in_channels == 3


def test_constructor_rejects_groups_and_wrong_index_length():
    with pytest.raises(ValueError, match="groups"):
        SampledConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="'index'"):
        SampledConv2d(2, 4, 3, source_channels=5, index=[0, 1, 2])
    with pytest.raises(ValueError, match="'index'"):
        SampledConv2d(2, 4, 3, source_channels=5, index=[0, 5])  # out of the source's range


def test_state_dict_round_trip_into_a_fresh_layer():
    conv = make_conv(stride=2, padding=1)
    x = inputs()
    layer = SampledConv2d.from_conv(conv, [4, 1, 2])
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "sampler.index"}
    assert state["sampler.index"].tolist() == [4, 1, 2]
    fresh = SampledConv2d(3, 4, 3, stride=2, padding=1, source_channels=5, index=[0, 1, 2])
    fresh.load_state_dict(state)
    assert fresh.sampler.index.tolist() == [4, 1, 2]  # the buffer is loaded, not rebuilt
    assert torch.equal(fresh(x), layer(x))


def test_deepcopy_and_save_load_round_trips(tmp_path):
    layer = SampledConv2d.from_conv(make_conv(padding=1), [3, 0])
    x = inputs()
    expected = layer(x)
    clone = copy.deepcopy(layer)
    assert clone.sampler.index.tolist() == [3, 0] and clone.sampler.in_channels == 5
    assert clone.weight.data_ptr() != layer.weight.data_ptr()
    assert torch.equal(clone(x), expected)
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded, SampledConv2d)
    assert loaded.sampler.index.tolist() == [3, 0] and loaded.sampler.in_channels == 5
    assert torch.equal(loaded(x), expected)


def test_trace_keeps_sampled_conv_as_one_leaf():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        SampledConv2d.from_conv(nn.Conv2d(6, 4, 3, padding=1), [5, 0, 3]),
    )
    gm = trace(model)
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert calls == [("call_module", "0"), ("call_module", "1"), ("call_module", "2")]
    assert isinstance(gm.get_submodule("2"), SampledConv2d)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))


# --- channels_last ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_channels_last_input_gives_the_contiguous_output(k):
    conv = make_conv(c=6, n=4, k=k, padding=k // 2)
    layer = SampledConv2d.from_conv(conv, [5, 0, 3]).to(memory_format=torch.channels_last)
    x = inputs(c=6)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    torch.testing.assert_close(layer(x_cl), reference(conv, x, [5, 0, 3]))


def test_a_1x1_layer_reads_channels_last_input_without_a_gather(monkeypatch):
    """A channel gather of a channels_last tensor copies it (~10x the 1x1 conv's time
    at ResNet-50's sizes): that path must not run it; contiguous input still does."""
    layer = SampledConv2d.from_conv(make_conv(c=6, n=4, k=1), [5, 0, 3])
    calls = []
    monkeypatch.setattr(Sampler, "forward", lambda self, x: calls.append(x) or x[:, self.index])
    x = inputs(c=6)  # (2, 6, 9, 9): 162 positions for 4 outputs
    layer(x.contiguous(memory_format=torch.channels_last))
    assert calls == []
    layer(x)
    assert len(calls) == 1
    # fewer positions than outputs: building the zero-padded weight would cost more
    small = x[:1, :, :1, :2].contiguous(memory_format=torch.channels_last)
    assert not small.is_contiguous()
    torch.testing.assert_close(layer(small), layer(small.contiguous()))
    assert len(calls) == 3
    cl = x.contiguous(memory_format=torch.channels_last)
    assert [layer.skips_gather(v) for v in (cl, x, small)] == [True, False, False]


def test_full_weight_is_zero_outside_the_index():
    layer = SampledConv2d.from_conv(make_conv(c=5, n=3, k=1), [4, 1])
    w = layer.full_weight()
    assert w.shape == (3, 5, 1, 1)
    assert torch.equal(w[:, [4, 1]], layer.weight)
    assert not w[:, [0, 2, 3]].any()


def test_channels_last_1x1_path_trains_the_kept_weight():
    layer = SampledConv2d.from_conv(make_conv(c=5, n=3, k=1), [4, 1])
    x = inputs(c=5).contiguous(memory_format=torch.channels_last)
    layer(x).square().sum().backward()
    expected = make_conv(c=5, n=3, k=1)
    F.conv2d(x[:, [4, 1]], expected.weight[:, [4, 1]], expected.bias).square().sum().backward()
    assert layer.weight.grad.shape == (3, 2, 1, 1)
    torch.testing.assert_close(layer.weight.grad, expected.weight.grad[:, [4, 1]])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript's deprecation notice
def test_fx_script_and_export_still_convert_a_layer_with_the_channels_last_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), SampledConv2d.from_conv(nn.Conv2d(6, 4, 1), [5, 0]))
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    expected = model(x.contiguous())
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected)
    torch.testing.assert_close(torch.jit.script(model)(x), expected)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)
