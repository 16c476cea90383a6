"""Tests of ``recon.graph``: discovery of prunable units from the torch.fx graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recon import models
from recon.graph import Graph, Unit, find_units, trace

torchvision = pytest.importorskip("torchvision")


def _conv_indices(features: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]


def _expected_vgg_units(features: nn.Sequential, classifier: str, taps_last: int):
    """(name, consumer, kind, width, taps, channelwise, consumer_bn) for a Sequential VGG."""
    convs = _conv_indices(features)
    expected = []
    for j, i in enumerate(convs):
        bn = f"features.{i + 1}" if isinstance(features[i + 1], nn.BatchNorm2d) else None
        if j + 1 < len(convs):
            nxt = convs[j + 1]
            consumer, kind, taps = f"features.{nxt}", "conv", 9
            cbn = f"features.{nxt + 1}" if isinstance(features[nxt + 1], nn.BatchNorm2d) else None
        else:
            consumer, kind, taps, cbn = classifier, "linear", taps_last, None
        expected.append(
            (
                f"features.{i}",
                consumer,
                kind,
                features[i].out_channels,
                taps,
                (bn,) if bn else (),
                cbn,
            )
        )
    return expected


def _as_tuples(graph: Graph):
    return [
        (u.name, u.consumer, u.consumer_kind, u.width, u.taps, u.channelwise, u.consumer_bn)
        for u in graph.units
    ]


# --------------------------------------------------------------------------- VGGs


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "nobn"])
def test_recon_vgg11_units(batch_norm):
    model = models.vgg11(width=0.25, batch_norm=batch_norm)
    graph = find_units(model)
    assert graph.skipped == {}
    expected = _expected_vgg_units(model.features, "classifier", taps_last=1)
    assert _as_tuples(graph) == expected
    assert len(graph.units) == 8
    assert graph.names == [e[0] for e in expected]
    for u in graph.units:
        assert u.producer == u.name
    # Widths follow the scaled configuration.
    assert [u.width for u in graph.units] == [v for v in model.cfg if v != "M"]
    if batch_norm:
        assert graph.units[0].channelwise == ("features.1",)
        assert graph.units[0].consumer_bn == "features.5"
    else:
        assert all(u.channelwise == () and u.consumer_bn is None for u in graph.units)


def test_recon_vgg_taps_follow_input_size():
    model = models.vgg11(width=0.125, input_size=64)
    last = find_units(model).units[-1]
    assert (last.consumer, last.consumer_kind) == ("classifier", "linear")
    assert last.taps == 4  # 64 / 2**5 = 2 -> 2x2 features per channel
    assert last.width * last.taps == model.classifier.in_features


def test_torchvision_vgg11_units():
    model = torchvision.models.vgg11(weights=None)
    graph = find_units(model)
    assert graph.skipped == {}
    assert _as_tuples(graph) == _expected_vgg_units(model.features, "classifier.0", 49)
    last = graph.units[-1]
    assert (last.name, last.consumer, last.taps, last.width) == (
        "features.18",
        "classifier.0",
        49,
        512,
    )


def test_torchvision_vgg11_bn_units():
    model = torchvision.models.vgg11_bn(weights=None)
    graph = find_units(model)
    assert graph.skipped == {}
    tuples = _as_tuples(graph)
    assert tuples == _expected_vgg_units(model.features, "classifier.0", 49)
    # Spot-check against hand-written expectations, not just the helper.
    assert tuples[0] == ("features.0", "features.4", "conv", 64, 9, ("features.1",), "features.5")
    assert tuples[-1] == ("features.25", "classifier.0", "linear", 512, 49, ("features.26",), None)
    for u in graph.units:
        for bn in u.channelwise:
            assert isinstance(model.get_submodule(bn), nn.BatchNorm2d)


def test_graph_unit_lookup():
    graph = find_units(models.vgg11(width=0.125))
    assert graph.unit("features.4").consumer == "features.8"
    assert isinstance(graph.unit("features.0"), Unit)
    assert graph.graph_module is not None
    with pytest.raises(KeyError):
        graph.unit("features.1")  # a BN, not a unit


# --------------------------------------------------------------------------- user models


def _plain_sequential_vgg() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.BatchNorm2d(8),  # 1
        nn.ReLU(inplace=True),  # 2
        nn.MaxPool2d(2),  # 3
        nn.Conv2d(8, 16, 3, padding=1, bias=False),  # 4
        nn.BatchNorm2d(16),  # 5
        nn.ReLU(),  # 6
        nn.Conv2d(16, 16, 3, padding=1),  # 7
        nn.ReLU(),  # 8
        nn.MaxPool2d(2),  # 9
        nn.Flatten(),  # 10
        nn.Linear(16 * 8 * 8, 32),  # 11
        nn.ReLU(),  # 12
        nn.Dropout(),  # 13
        nn.Linear(32, 10),  # 14
    )


def test_plain_sequential_vgg():
    model = _plain_sequential_vgg()
    graph = find_units(model)
    assert graph.skipped == {}
    assert _as_tuples(graph) == [
        ("0", "4", "conv", 8, 9, ("1",), "5"),
        ("4", "7", "conv", 16, 9, ("5",), None),
        ("7", "11", "linear", 16, 64, (), None),
    ]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


class _ViewVGG(nn.Module):
    """Custom forward with functional ops and ``x.view(x.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 4)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def test_custom_forward_with_view_and_functional_ops():
    model = _ViewVGG()
    graph = find_units(model)
    assert graph.skipped == {}
    assert _as_tuples(graph) == [
        ("conv1", "conv2", "conv", 8, 9, (), "bn2"),
        ("conv2", "conv3", "conv", 12, 1, ("bn2",), None),
        ("conv3", "fc", "linear", 6, 16, (), None),
    ]


class _ReshapeShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        x = self.conv1(x).relu()
        x = nn.functional.avg_pool2d(self.conv2(x), 4)
        return self.fc(x.reshape(x.shape[0], -1))


def test_reshape_with_shape_query():
    graph = find_units(_ReshapeShape())
    assert _as_tuples(graph) == [
        ("conv1", "conv2", "conv", 4, 9, (), None),
        ("conv2", "fc", "linear", 5, 4, (), None),
    ]


# --------------------------------------------------------------------------- skipped


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y))
        x = F.relu(x + y)
        x = F.adaptive_avg_pool2d(F.relu(self.head(x)), 1)
        return self.fc(torch.flatten(x, 1))


def test_residual_add_is_coupled():
    graph = find_units(_Residual())
    assert graph.names == ["conv_a.sampler", "conv_a", "head"]
    sampler = graph.unit("conv_a.sampler")
    assert (sampler.kind, sampler.producer, sampler.consumer) == ("sampler", None, "conv_a")
    assert (sampler.width, sampler.taps) == (8, 9)
    assert graph.unit("conv_a").consumer == "conv_b"
    assert graph.unit("conv_a").channelwise == ("bn_a",)
    assert graph.unit("conv_a").consumer_bn == "bn_b"
    assert graph.unit("head").consumer == "fc"
    assert graph.unit("head").taps == 1
    assert set(graph.skipped) == {"stem", "conv_b"}
    assert "coupled" in graph.skipped["conv_b"]
    assert "coupled" in graph.skipped["stem"]
    assert "used by 2" in graph.skipped["stem"]


def test_torchvision_resnet_blocks():
    model = torchvision.models.resnet18(weights=None)
    graph = find_units(model)
    # Inner convs of each BasicBlock are units, with a sampler in front of each block's
    # conv1; block outputs and the stem are coupled.
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert graph.names == [f"{b}.conv1{s}" for b in blocks for s in (".sampler", "")]
    for u in graph.units:
        if u.kind == "sampler":
            assert u.consumer == u.name.removesuffix(".sampler")
        else:
            assert u.consumer == u.name.replace("conv1", "conv2")
            assert u.channelwise == (u.name.replace("conv1", "bn1"),)
    assert [b.name for b in graph.blocks] == blocks
    for name in ("conv1", "layer1.0.conv2", "layer2.0.downsample.0", "layer4.1.conv2"):
        assert name in graph.skipped
        assert "coupled" in graph.skipped[name]


@pytest.mark.parametrize(
    ("groups", "out", "why"),
    [(2, 8, None), (8, 16, "depth multiplier 2")],
    ids=["grouped", "depth-multiplier"],
)
def test_grouped_conv_consumer(groups, out, why):
    # A depthwise conv (groups = in = out) is cut along with its producer instead: see
    # test_depthwise.py; grouped convs in test_grouped.py.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, out, 3, padding=1, groups=groups),
        nn.ReLU(),
        nn.Conv2d(out, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 2),
    )
    graph = find_units(model)
    assert not graph.unsupported
    if why is None:
        assert graph.names == ["0", "2", "4"]
        assert (graph.unit("0").groups, graph.unit("2").producer_groups) == (groups, groups)
    else:
        assert graph.names == ["2", "4"]
        assert "'2'" in graph.skipped["0"] and why in graph.skipped["0"]


def test_other_unsupported_patterns_are_skipped_with_reasons():
    class Sub(nn.Conv2d):
        pass

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)  # -> reflect-padded conv: unsupported consumer
            self.b = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
            self.c = nn.Conv2d(4, 4, 1)  # -> Linear on the last dim (no flatten)
            self.lin = nn.Linear(6, 6)
            self.d = Sub(4, 4, 1)  # a Conv2d subclass
            self.e = nn.Conv2d(4, 4, 1)  # the model's output

        def forward(self, x):
            x = self.b(self.a(x))
            x = self.lin(self.c(x))
            return self.e(self.d(x))

    graph = find_units(M())
    assert graph.units == []
    assert "padding_mode" in graph.skipped["a"] and "'b'" in graph.skipped["a"]
    assert "padding_mode" in graph.skipped["b"]
    assert "lin" in graph.skipped["c"] and "cannot see through" in graph.skipped["c"]
    assert "subclass" in graph.skipped["d"]
    assert "output" in graph.skipped["e"]


@pytest.mark.parametrize("readers", [1, 2])
def test_conv_into_concat_is_a_slice_of_each_reader(readers):
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.c, self.d = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], dim=1)
            return self.c(y) if readers == 1 else self.c(y) + self.d(y)

    graph = find_units(Cat())  # tests/test_concat.py
    found = [(u.name, [(r.consumer, r.cat_lead) for r in (u, *u.readers)]) for u in graph.units]
    if readers == 1:
        assert found == [("a", [("c", ())]), ("b", [("c", ("a",))])]
    else:
        assert found == [
            ("a", [("c", ()), ("d", ())]),
            ("b", [("c", ("a",)), ("d", ("a",))]),
        ]


# --------------------------------------------------------------------------- tracing


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


def test_data_dependent_control_flow_raises():
    with pytest.raises(ValueError, match="_DataDependent") as info:
        trace(_DataDependent())
    assert "control flow" in str(info.value)
    with pytest.raises(ValueError, match="_DataDependent"):
        find_units(_DataDependent())


def test_find_units_accepts_a_traced_module():
    model = models.vgg11(width=0.125, batch_norm=False)
    gm = trace(model)
    assert _as_tuples(find_units(model, gm)) == _as_tuples(find_units(model))


def test_conv_not_called_in_forward_is_recorded():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)
            self.spare = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(self.a(x))

    graph = find_units(Unused())
    assert graph.names == ["a"]
    assert "does not call it" in graph.skipped["spare"]


class _Shared(nn.Module):
    """``a`` is applied twice: its weights are shared between two call sites."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.a(F.relu(self.a(x))))
        return self.fc(torch.flatten(F.relu(self.head(x)), 1))


def test_shared_conv_is_skipped():
    graph = find_units(_Shared())
    assert graph.names == ["head"]  # unique unit names, no unit for either call of 'a'
    assert "2 times" in graph.skipped["a"] and "shared" in graph.skipped["a"]
    # stem's consumer is shared: slicing its inputs would break the other call.
    assert "'a'" in graph.skipped["stem"] and "shared" in graph.skipped["stem"]


# --------------------------------------------------------------------------- see-through ops


class _ScalarOps(nn.Module):
    """Element-wise arithmetic with numbers, hand-written activations, a spatial mean."""

    def __init__(self, head: str = "flat"):
        super().__init__()
        self.head = head
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 10, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(10)
        self.conv3 = nn.Conv2d(10, 12, 3, padding=1)
        self.conv4 = nn.Conv2d(12, 6, 1)
        self.conv5 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = self.conv1(x) * 0.5 + 1  # scalar arithmetic
        x = self.bn2(self.conv2(x.clamp(0, 6)))
        x = x * F.relu6(x + 3) / 6  # hand-written hard-swish
        x = self.conv3(x)
        x = x * torch.sigmoid(x)  # hand-written swish
        x = F.max_pool2d(self.conv4(x), 2)
        x = (-x).abs() ** 2
        if self.head == "keepdim":  # (B, 6, 1, 1) into a 1x1 conv, then flattened
            x = self.conv5(x.mean((2, 3), keepdim=True))
            return self.fc(torch.flatten(x, 1))
        x = self.conv5(x)
        return self.fc(x.sum(dim=(-2, -1)))  # a hand-written global pooling


@pytest.mark.parametrize("head", ["flat", "keepdim"])
def test_scalar_arithmetic_activations_and_spatial_means_are_channelwise(head):
    model = _ScalarOps(head)
    graph = find_units(model)
    assert graph.skipped == {}
    assert _as_tuples(graph) == [
        ("conv1", "conv2", "conv", 8, 9, (), "bn2"),
        ("conv2", "conv3", "conv", 10, 9, ("bn2",), None),
        ("conv3", "conv4", "conv", 12, 1, (), None),
        ("conv4", "conv5", "conv", 6, 1, (), None),
        ("conv5", "fc", "linear", 5, 1, (), None),
    ]


def test_what_still_couples_channels():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.c = nn.Conv2d(4, 4, 1)
            self.d = nn.Conv2d(4, 4, 1)
            self.e = nn.Conv2d(4, 4, 1)
            self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

        def forward(self, x):
            x = self.a(x)
            x = self.b(x * self.scale)  # a tensor operand, not a number
            x = x * self.bn(x)  # a BatchNorm inside the expression
            x = self.c(x)
            x = x.mean(1, keepdim=True) + x  # a mean over channels
            x = self.d(x)
            return self.e(x - x.mean((1, 2), keepdim=True))

    graph = find_units(M())
    assert graph.units == []
    assert "combines it with other values" in graph.skipped["a"]
    assert "BatchNorm2d" in graph.skipped["b"]
    for name in ("c", "d"):
        assert "used by 2 nodes" in graph.skipped[name] and "coupled" in graph.skipped[name]
