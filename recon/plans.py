"""Channel configurations from the literature, as named plans for :func:`recon.prune`.

A plan is data: the channels kept per unit of one torchvision model, with the paper
and the published network (or released model) it comes from. :func:`get` returns the
``channels=`` dict for :func:`recon.prune`; units a plan does not name keep all their
channels.

Unit names are those of :func:`recon.graph.find_units`: the qualified names of the
producer convolutions (``"features.0"`` is VGG-16's conv1_1 in torchvision,
``"layer1.0.conv1"`` the first 1x1 conv of ResNet-50's first bottleneck).

=========================  =====================  ======================================
plan                       model                  source
=========================  =====================  ======================================
``he2017_vgg16_5x``        torchvision vgg16      He et al., ICCV 2017: VGG-16 5x
``thinet_vgg16_conv``      torchvision vgg16      Luo et al., ICCV 2017: ThiNet-Conv
``thinet_vgg16_tiny``      torchvision vgg16      Luo et al., ICCV 2017: ThiNet-Tiny
``thinet_resnet50_30``     torchvision resnet50   Luo et al., TPAMI 2018: ThiNet-30
``thinet_resnet50_50``     torchvision resnet50   Luo et al., TPAMI 2018: ThiNet-50
``thinet_resnet50_70``     torchvision resnet50   Luo et al., TPAMI 2018: ThiNet-70
=========================  =====================  ======================================

Examples
--------
>>> from recon import plans
>>> "thinet_resnet50_50" in plans.names()
True
>>> channels = plans.get("thinet_resnet50_50")
>>> channels["layer1.0.conv1"], channels["layer4.2.conv2"]
(32, 256)
>>> print(plans.describe("thinet_resnet50_50").splitlines()[0])
thinet_resnet50_50: for torchvision resnet50

Prune a model with it (``calib`` a batch of calibration images)::

    model = torchvision.models.resnet50(weights=...)
    result = recon.prune(model, calib, channels=plans.get("thinet_resnet50_50"))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["PLANS", "Plan", "describe", "get", "names"]


@dataclass(frozen=True)
class Plan:
    """A published channel configuration for one model.

    Attributes
    ----------
    model : str
        The model the unit names refer to, e.g. ``"torchvision vgg16"``.
    source : str
        The paper, and the published network or released model, of the channel counts.
    channels : mapping of str to int
        Channels kept per unit name (read-only); units not listed are not pruned.
    notes : str
        How the plan relates to the published network (differences, what is left out).
    """

    model: str
    source: str
    channels: Mapping[str, int]
    notes: str = ""


# ---------------------------------------------------------------------------- helpers

# VGG-16's conv layers in torchvision's ``features`` Sequential (conv, ReLU, and a
# max-pool after each stage): conv1_1 is features.0, conv5_3 features.28.
_VGG16_CONVS = {
    "conv1_1": "features.0",
    "conv1_2": "features.2",
    "conv2_1": "features.5",
    "conv2_2": "features.7",
    "conv3_1": "features.10",
    "conv3_2": "features.12",
    "conv3_3": "features.14",
    "conv4_1": "features.17",
    "conv4_2": "features.19",
    "conv4_3": "features.21",
    "conv5_1": "features.24",
    "conv5_2": "features.26",
    "conv5_3": "features.28",
}
# torchvision resnet50: bottleneck blocks per stage (layer1..layer4).
_RESNET50_BLOCKS = (3, 4, 6, 3)


def _vgg16(counts: Sequence[int]) -> dict[str, int]:
    """Unit name -> channels for VGG-16 counts given in order conv1_1, conv1_2, ...

    Fewer than 13 counts leave the remaining (last) layers unpruned.
    """
    return dict(zip(_VGG16_CONVS.values(), counts, strict=False))


def _resnet50_inner(widths: Sequence[int]) -> dict[str, int]:
    """The inner width of every bottleneck (its conv1 and conv2 outputs), per stage."""
    channels: dict[str, int] = {}
    for stage, (blocks, width) in enumerate(zip(_RESNET50_BLOCKS, widths, strict=True), 1):
        for block in range(blocks):
            channels[f"layer{stage}.{block}.conv1"] = width
            channels[f"layer{stage}.{block}.conv2"] = width
    return channels


def _plan(model: str, source: str, channels: dict[str, int], notes: str = "") -> Plan:
    return Plan(model, source, MappingProxyType(channels), notes)


_THINET_ICCV = (
    "Luo, Wu & Lin, 'ThiNet: A Filter Level Pruning Method for Deep Neural Network "
    "Compression', ICCV 2017"
)
_THINET_TPAMI = (
    "Luo et al., 'ThiNet: Pruning CNN Filters for a Thinner Net', TPAMI 2018 (first in ICCV 2017)"
)
_THINET_RESNET_NOTES = (
    "Only the inner layers of each bottleneck are pruned: conv1 and conv2 keep "
    "int({ratio} * width) of the stage's 64/128/256/512 channels, as in the authors' "
    "code (github.com/Roll920/ThiNet_Code); block outputs, shortcuts and the stem are "
    "kept, so the plan has no sampler units. The paper's ResNet-50 is the original "
    "Caffe model, with the stride of a downsampling block in its first 1x1 conv: "
    "{paper} GFLOPs (2 per multiply-accumulate) of 7.72. torchvision's resnet50 has "
    "the stride in the 3x3 conv, so the same widths give {here} GFLOPs of 8.18 there."
)

_PLANS: dict[str, Plan] = {
    "he2017_vgg16_5x": _plan(
        "torchvision vgg16",
        "He, Zhang & Sun, 'Channel Pruning for Accelerating Very Deep Neural Networks', "
        "ICCV 2017: channel counts of the released VGG-16 5x model "
        "(github.com/yihui-he/channel-pruning)",
        _vgg16([24, 22, 41, 51, 108, 89, 111, 184, 276, 228]),
        "conv1_1..conv4_3 pruned; conv5_1..conv5_3 (features.24-28) and the FC layers "
        "are kept. Conv layers: 15.35 -> 3.39 G multiply-accumulates at 224x224.",
    ),
    "thinet_vgg16_conv": _plan(
        "torchvision vgg16",
        f"{_THINET_ICCV}, ImageNet VGG-16 results (ThiNet-Conv; 9.58 GFLOPs and "
        "131.44M parameters in the authors' code release, github.com/Roll920/ThiNet_Code)",
        _vgg16([32, 32, 64, 64, 128, 128, 128, 256, 256, 256]),
        "conv1_1..conv4_3 keep half their channels; conv5_x and the FC layers are "
        "kept. Whole network: 9.58 GFLOPs (4.79 G multiply-accumulates) and 131.45M "
        "parameters at 224x224, as published.",
    ),
    "thinet_vgg16_tiny": _plan(
        "torchvision vgg16",
        f"{_THINET_ICCV}, ImageNet VGG-16 results (ThiNet-Tiny; 2.01 GFLOPs, 1.32M "
        "parameters); widths from the released model's trainval.prototxt "
        "(github.com/Roll920/ThiNet)",
        _vgg16([16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 256]),
        "Every conv layer is pruned, conv5_3 (features.28) to 256. Conv layers: 1.00 G "
        "multiply-accumulates (2.01 GFLOPs, as published) at 224x224. The published "
        "network also replaces the FC layers by global average pooling and one "
        "256 -> 1000 linear layer; recon keeps torchvision's FC layers (with fc6 "
        "reading 256 channels), so parameters and total FLOPs are larger than published.",
    ),
    "thinet_resnet50_30": _plan(
        "torchvision resnet50",
        f"{_THINET_TPAMI}, ImageNet ResNet-50 results (ThiNet-30)",
        _resnet50_inner([19, 38, 76, 153]),
        _THINET_RESNET_NOTES.format(ratio=0.3, paper="2.20", here="2.33"),
    ),
    "thinet_resnet50_50": _plan(
        "torchvision resnet50",
        f"{_THINET_TPAMI}, ImageNet ResNet-50 results (ThiNet-50)",
        _resnet50_inner([32, 64, 128, 256]),
        _THINET_RESNET_NOTES.format(ratio=0.5, paper="3.41", here="3.64"),
    ),
    "thinet_resnet50_70": _plan(
        "torchvision resnet50",
        f"{_THINET_TPAMI}, ImageNet ResNet-50 results (ThiNet-70)",
        _resnet50_inner([44, 89, 179, 358]),
        _THINET_RESNET_NOTES.format(ratio=0.7, paper="4.88", here="5.20"),
    ),
}

PLANS: Mapping[str, Plan] = MappingProxyType(_PLANS)
"""All plans by name (read-only)."""


# ------------------------------------------------------------------------------ access


def _lookup(name: str) -> Plan:
    if not isinstance(name, str) or name not in _PLANS:
        raise ValueError(f"The 'name' argument must be one of {names()}. Got {name!r} instead.")
    return _PLANS[name]


def names() -> list[str]:
    """Names of all plans.

    Returns
    -------
    list of str
        The plan names, in the order of the module's table.
    """
    return list(_PLANS)


def get(name: str) -> dict[str, int]:
    """The ``channels=`` dict of a plan, for :func:`recon.prune`.

    Parameters
    ----------
    name : str
        A plan name (see :func:`names`).

    Returns
    -------
    dict of str to int
        Channels kept per unit name; a new dict on every call, free to modify.

    Raises
    ------
    ValueError
        If ``name`` is not a plan name; the message lists the known names.

    Examples
    --------
    >>> get("he2017_vgg16_5x")["features.0"]
    24
    """
    return dict(_lookup(name).channels)


def describe(name: str) -> str:
    """Where a plan comes from and which model it applies to.

    Parameters
    ----------
    name : str
        A plan name (see :func:`names`).

    Returns
    -------
    str
        Several lines: the model, the source, the notes and the number of units.

    Raises
    ------
    ValueError
        If ``name`` is not a plan name; the message lists the known names.
    """
    plan = _lookup(name)
    lines = [f"{name}: for {plan.model}", f"source: {plan.source}"]
    if plan.notes:
        lines.append(f"notes: {plan.notes}")
    lines.append(f"units: {len(plan.channels)} (others keep all their channels)")
    return "\n".join(lines)
