"""CIFAR-style model definitions used by the scripts, the CLI and the tests.

The architectures follow torchvision's conventions: helpers first, the architecture as
data, then the model classes, then thin keyword-only builders.

VGG
    A VGG is a list such as ``[64, 64, "M", 128, ...]``. A pruned VGG is simply another
    such list, which makes the configuration lists the natural way to describe a pruning
    plan. Unlike torchvision's ImageNet VGG, the CIFAR variant has no adaptive pooling,
    no dropout and a single linear classifier: the feature map after the last pooling
    layer is flattened straight into ``nn.Linear(channels * s * s, num_classes)``.

ResNet
    The CIFAR ResNets of He et al. (2016), depth ``6n + 2``: a 3x3 stem, three stages
    of ``n`` :class:`BasicBlock` each (16, 32 and 64 channels; strides 1, 2, 2), global
    average pooling and one linear layer. The architecture is the pair ``blocks``
    (blocks per stage, ``(n, n, n)``) and ``widths`` (channels per stage). Shortcuts
    are torchvision's "option B": identity where the shape is kept, a 1x1 convolution +
    BatchNorm projection where the stride or the channel count changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._checks import _check_positive_int, _check_width
from .convnext import cifar_convnext  # its own module: ConvNeXt for 32 px
from .mobilenet import cifar_mobilenet_v2  # its own module: MobileNetV2 for 32 px

__all__ = [
    "PRETRAINED_MANIFEST",
    "VGG",
    "VGG_CFGS",
    "BasicBlock",
    "CifarResNet",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "digits_resnet20",
    "digits_vgg",
    "pretrained",
    "pretrained_names",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
]

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, *, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1 (spatial size kept at ``stride=1``, halved at 2)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_planes: int, out_planes: int, *, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (the projection of an option-B shortcut)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width``, at least 1."""
    return max(1, round(channels * width))


def _check_int_list(owner: str, name: str, value: object, length: int | None = None) -> list[int]:
    """``value`` as a list of ints >= 1 (of ``length`` entries if given), else ValueError."""
    if length is None:
        expected = "a non-empty list of ints >= 1"
    else:
        expected = f"a list of {length} ints >= 1 (one per stage)"
    ok = (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    )
    if not ok:
        raise ValueError(
            f"The {name!r} parameter of {owner} must be {expected}. Got {value!r} instead."
        )
    return list(value)


def _check_cfg(cfg: object) -> list[int | str]:
    if not isinstance(cfg, (list, tuple)) or len(cfg) == 0:
        raise ValueError(
            f"The 'cfg' parameter of VGG must be a non-empty list of ints and 'M'. "
            f"Got {cfg!r} instead."
        )
    out: list[int | str] = []
    for i, v in enumerate(cfg):
        if v == "M":
            out.append("M")
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            out.append(v)
        else:
            raise ValueError(
                f"The 'cfg' parameter of VGG must contain ints >= 1 or 'M'. "
                f"Got {v!r} at index {i} instead."
            )
    if not any(v != "M" for v in out):
        raise ValueError(f"The 'cfg' parameter of VGG must contain a convolution. Got {cfg!r}.")
    return out


# --------------------------------------------------------------------------------------
# Architectures as data
# --------------------------------------------------------------------------------------

#: VGG configurations (torchvision's lists). Ints are 3x3 conv output channels,
#: ``"M"`` is a 2x2 max-pool with stride 2.
# fmt: off
VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# fmt: on

#: Small VGG for scikit-learn's ``load_digits`` (1x8x8 images, 10 classes).
DIGITS_VGG_CFG: list[int | str] = [16, 16, "M", 32, 32, "M", 64, "M"]

#: Channels of the three stages of a CIFAR ResNet (the stem has ``widths[0]``).
CIFAR_RESNET_WIDTHS: tuple[int, ...] = (16, 32, 64)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class VGG(nn.Module):
    """CIFAR-style VGG: 3x3 conv [+ BN] + ReLU stacks, max-pools, one linear layer.

    Parameters
    ----------
    cfg : list of int or "M"
        Architecture: an int ``c`` is a 3x3 convolution with ``c`` output channels
        (padding 1) followed by ``BatchNorm2d`` (if ``batch_norm``) and ``ReLU``;
        ``"M"`` is a 2x2 max-pool with stride 2.
    in_channels : int, default=3
        Channels of the input images.
    num_classes : int, default=10
        Outputs of the classifier.
    batch_norm : bool, default=True
        Insert ``BatchNorm2d`` after each convolution. Convolutions have a bias only
        when there is no batch norm.
    width : float, default=1.0
        Multiplier of every channel count in ``cfg``: a conv gets
        ``max(1, round(c * width))`` channels.
    input_size : int, default=32
        Height and width of the (square) input. Must be divisible by ``2 ** m`` where
        ``m`` is the number of ``"M"`` in ``cfg``.

    Attributes
    ----------
    features : nn.Sequential
        Convolutional part.
    classifier : nn.Linear
        ``Linear(last_channels * s * s, num_classes)`` with ``s = input_size / 2**m``.
    cfg : list of int or "M"
        The configuration after width scaling (actual channel counts).

    Examples
    --------
    >>> import torch
    >>> from recon.models import VGG
    >>> model = VGG([8, "M", 16, "M"], input_size=8)
    >>> model(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    >>> model.classifier
    Linear(in_features=64, out_features=10, bias=True)
    """

    def __init__(
        self,
        cfg: list[int | str],
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        batch_norm: bool = True,
        width: float = 1.0,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        cfg = _check_cfg(cfg)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("input_size", input_size)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(
                f"The 'width' parameter of VGG must be a float in (0, inf). Got {width!r} instead."
            )
        n_pool = sum(1 for v in cfg if v == "M")
        if input_size % (2**n_pool) != 0:
            raise ValueError(
                f"The 'input_size' parameter of VGG must be divisible by 2**{n_pool} = "
                f"{2**n_pool} (the number of max-pools in 'cfg'). Got {input_size} instead."
            )

        self.cfg: list[int | str] = [v if v == "M" else _scaled(v, width) for v in cfg]
        layers: list[nn.Module] = []
        channels = in_channels
        for v in self.cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(conv3x3(channels, v, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            channels = v
        self.features = nn.Sequential(*layers)
        spatial = input_size // 2**n_pool
        self.classifier = nn.Linear(channels * spatial * spatial, num_classes)

        for m in self.modules():
            self.init_weights(m)

    @staticmethod
    def init_weights(m: nn.Module) -> None:
        """This architecture's initialisation of one module (conv: Kaiming normal,
        fan-out; BatchNorm: 1, 0; linear: N(0, 0.01), 0), applied in ``modules()`` order
        by the constructor; e.g. ``recon.reinit(pruned, seed, init=VGG.init_weights)``."""
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (N, C, s, s)
        x = torch.flatten(x, 1)  # (N, C*s*s)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convolutions: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))``.

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Output channels of both convolutions.
    stride : int, default=1
        Stride of ``conv1`` and of the shortcut projection.

    Attributes
    ----------
    conv1, bn1, relu, conv2, bn2 : nn.Module
        The residual branch (torchvision's names). ``relu`` is applied after ``bn1`` and
        again after the sum.
    downsample : nn.Sequential or None
        Option-B shortcut ``s``: ``Sequential(Conv2d(in_planes, planes, 1, stride),
        BatchNorm2d(planes))`` when ``stride != 1`` or ``in_planes != planes``, else
        None (identity).

    Examples
    --------
    >>> import torch
    >>> from recon.models import BasicBlock
    >>> BasicBlock(8, 8).downsample is None
    True
    >>> block = BasicBlock(8, 16, stride=2)
    >>> block(torch.zeros(2, 8, 8, 8)).shape
    torch.Size([2, 16, 4, 4])
    >>> block.downsample[0]
    Conv2d(8, 16, kernel_size=(1, 1), stride=(2, 2), bias=False)
    """

    expansion: int = 1

    def __init__(self, in_planes: int, planes: int, *, stride: int = 1) -> None:
        super().__init__()
        _check_positive_int("in_planes", in_planes)
        _check_positive_int("planes", planes)
        _check_positive_int("stride", stride)
        self.conv1 = conv3x3(in_planes, planes, stride=stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                conv1x1(in_planes, planes, stride=stride), nn.BatchNorm2d(planes)
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (N, planes, h, w)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity  # not in place: the add is a plain node in the fx graph
        return self.relu(out)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, stages of :class:`BasicBlock`, pooling, linear.

    Parameters
    ----------
    blocks : sequence of int
        Blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20. Stage ``i`` is the
        attribute ``layer{i+1}``; the first stage has stride 1, every later one stride 2.
    widths : sequence of int, default=(16, 32, 64)
        Channels per stage, one entry per entry of ``blocks``. The stem has
        ``widths[0]`` channels.
    in_channels : int, default=3
        Channels of the input images.
    num_classes : int, default=10
        Outputs of the classifier.
    width : float, default=1.0
        Multiplier of every entry of ``widths``: ``max(1, round(w * width))`` channels.

    Attributes
    ----------
    conv1, bn1, relu : nn.Module
        The stem (3x3 conv, stride 1).
    layer1, layer2, ... : nn.Sequential of BasicBlock
        The stages.
    avgpool : nn.AdaptiveAvgPool2d
        Global average pooling to 1x1, so any input size at least ``2**(stages-1)`` works.
    fc : nn.Linear
        ``Linear(widths[-1], num_classes)`` (after width scaling).
    blocks : tuple of int
        Blocks per stage.
    widths : tuple of int
        Channels per stage after width scaling.

    Notes
    -----
    Depth (weighted layers) is ``2 * sum(blocks) + 2``; the 1x1 projections of the
    shortcuts are not counted, as in He et al. (2016).

    Examples
    --------
    >>> import torch
    >>> from recon.models import CifarResNet
    >>> model = CifarResNet([1, 1], widths=[8, 16])
    >>> model(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    >>> model.fc
    Linear(in_features=16, out_features=10, bias=True)
    """

    def __init__(
        self,
        blocks: Sequence[int],
        *,
        widths: Sequence[int] = CIFAR_RESNET_WIDTHS,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        blocks = _check_int_list("CifarResNet", "blocks", blocks)
        widths = _check_int_list("CifarResNet", "widths", widths, length=len(blocks))
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        width = _check_width("CifarResNet", width)

        self.blocks: tuple[int, ...] = tuple(blocks)
        self.widths: tuple[int, ...] = tuple(_scaled(w, width) for w in widths)
        channels = self.widths[0]
        self.conv1 = conv3x3(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self._stages: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(blocks)))
        for i, (name, n, planes) in enumerate(zip(self._stages, blocks, self.widths, strict=True)):
            stage = [BasicBlock(channels, planes, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.add_module(name, nn.Sequential(*stage))
            channels = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for m in self.modules():
            self.init_weights(m)

    @staticmethod
    def init_weights(m: nn.Module) -> None:
        """This architecture's initialisation of one module (conv: Kaiming normal,
        fan-out; BatchNorm: 1, 0; linear: PyTorch's default), applied in ``modules()``
        order by the constructor; e.g. ``recon.reinit(pruned, seed,
        init=CifarResNet.init_weights)``."""
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, widths[0], H, W)
        for name in self._stages:
            x = getattr(self, name)(x)  # stride 2 from the second stage on
        x = self.avgpool(x)  # (N, widths[-1], 1, 1)
        x = torch.flatten(x, 1)  # (N, widths[-1])
        return self.fc(x)


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def _vgg(
    name: str,
    *,
    batch_norm: bool,
    width: float,
    num_classes: int,
    in_channels: int,
    input_size: int,
) -> VGG:
    return VGG(
        VGG_CFGS[name],
        in_channels=in_channels,
        num_classes=num_classes,
        batch_norm=batch_norm,
        width=width,
        input_size=input_size,
    )


def vgg11(
    *,
    batch_norm: bool = True,
    width: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
) -> VGG:
    """VGG-11 (configuration "A") for CIFAR-sized inputs. See :class:`VGG`."""
    return _vgg(
        "vgg11",
        batch_norm=batch_norm,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
    )


def vgg13(
    *,
    batch_norm: bool = True,
    width: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
) -> VGG:
    """VGG-13 (configuration "B") for CIFAR-sized inputs. See :class:`VGG`."""
    return _vgg(
        "vgg13",
        batch_norm=batch_norm,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
    )


def vgg16(
    *,
    batch_norm: bool = True,
    width: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
) -> VGG:
    """VGG-16 (configuration "D") for CIFAR-sized inputs. See :class:`VGG`."""
    return _vgg(
        "vgg16",
        batch_norm=batch_norm,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
    )


def vgg19(
    *,
    batch_norm: bool = True,
    width: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
) -> VGG:
    """VGG-19 (configuration "E") for CIFAR-sized inputs. See :class:`VGG`."""
    return _vgg(
        "vgg19",
        batch_norm=batch_norm,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
    )


def digits_vgg(*, width: float = 1.0) -> VGG:
    """Small VGG with batch norm for scikit-learn's ``load_digits`` (1x8x8, 10 classes).

    Configuration ``[16, 16, "M", 32, 32, "M", 64, "M"]``: after three pools the
    feature map is 64x1x1, so the classifier is ``Linear(64, 10)`` (at ``width=1``).

    Parameters
    ----------
    width : float, default=1.0
        Channel multiplier, see :class:`VGG`.

    Returns
    -------
    VGG

    Examples
    --------
    >>> import torch
    >>> from recon.models import digits_vgg
    >>> digits_vgg()(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """
    return VGG(
        DIGITS_VGG_CFG,
        in_channels=1,
        num_classes=10,
        batch_norm=True,
        width=width,
        input_size=8,
    )


def cifar_resnet(
    depth: int,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
) -> CifarResNet:
    """CIFAR ResNet of ``depth = 6n + 2`` layers: three stages of ``n`` basic blocks.

    Parameters
    ----------
    depth : int
        Weighted layers, ``6n + 2`` with ``n >= 1`` (8, 14, 20, 26, 32, ...).
    num_classes : int, default=10
        Outputs of the classifier.
    in_channels : int, default=3
        Channels of the input images.
    width : float, default=1.0
        Channel multiplier of the stages (16, 32, 64), see :class:`CifarResNet`.

    Returns
    -------
    CifarResNet
        With ``blocks == (n, n, n)``, ``n = (depth - 2) // 6``.

    Examples
    --------
    >>> import torch
    >>> from recon.models import cifar_resnet
    >>> model = cifar_resnet(14)
    >>> model.blocks
    (2, 2, 2)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "The 'depth' parameter of cifar_resnet must be an int 6n + 2 with n >= 1 "
            f"(8, 14, 20, ..., 56, ..., 110). Got {depth!r} instead."
        )
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), in_channels=in_channels, num_classes=num_classes, width=width)


def cifar_resnet20(
    *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, about 0.27M parameters).

    See :func:`cifar_resnet` for the parameters.

    Examples
    --------
    >>> import torch
    >>> from recon.models import cifar_resnet20
    >>> cifar_resnet20()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return cifar_resnet(20, num_classes=num_classes, in_channels=in_channels, width=width)


def cifar_resnet32(
    *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage). See :func:`cifar_resnet`.

    Examples
    --------
    >>> import torch
    >>> from recon.models import cifar_resnet32
    >>> cifar_resnet32(num_classes=100)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """
    return cifar_resnet(32, num_classes=num_classes, in_channels=in_channels, width=width)


def cifar_resnet44(
    *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage). See :func:`cifar_resnet`.

    Examples
    --------
    >>> import torch
    >>> from recon.models import cifar_resnet44
    >>> cifar_resnet44(width=0.5)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return cifar_resnet(44, num_classes=num_classes, in_channels=in_channels, width=width)


def cifar_resnet56(
    *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage). See :func:`cifar_resnet`.

    Examples
    --------
    >>> import torch
    >>> from recon.models import cifar_resnet56
    >>> cifar_resnet56()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return cifar_resnet(56, num_classes=num_classes, in_channels=in_channels, width=width)


def cifar_resnet110(
    *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage). See :func:`cifar_resnet`.

    Examples
    --------
    >>> import torch
    >>> from recon.models import cifar_resnet110
    >>> cifar_resnet110(in_channels=1)(torch.zeros(2, 1, 16, 16)).shape
    torch.Size([2, 10])
    """
    return cifar_resnet(110, num_classes=num_classes, in_channels=in_channels, width=width)


def digits_resnet20(*, width: float = 1.0) -> CifarResNet:
    """ResNet-20 for scikit-learn's ``load_digits`` (1x8x8 images, 10 classes).

    The stages see 8x8, 4x4 and 2x2 feature maps; global pooling gives 64 features
    (at ``width=1``) for ``Linear(64, 10)``.

    Parameters
    ----------
    width : float, default=1.0
        Channel multiplier, see :class:`CifarResNet`.

    Returns
    -------
    CifarResNet

    Examples
    --------
    >>> import torch
    >>> from recon.models import digits_resnet20
    >>> digits_resnet20()(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """
    return cifar_resnet(20, num_classes=10, in_channels=1, width=width)


# --------------------------------------------------------------------------------------
# Shipped pretrained baselines
# --------------------------------------------------------------------------------------

#: The manifest of the checkpoints shipped in ``recon/assets``: for each name the
#: builder and its arguments, the file and its sha256, how it was trained (data, seed,
#: epochs, command) and its test accuracy. Written by ``scripts/train.py``.
PRETRAINED_MANIFEST = Path(__file__).parent / "assets" / "pretrained.json"


def _manifest() -> dict[str, dict]:
    if not PRETRAINED_MANIFEST.exists():
        return {}
    return json.loads(PRETRAINED_MANIFEST.read_text(encoding="utf-8"))


def pretrained_names() -> list[str]:
    """Names of the shipped pretrained models, for :func:`pretrained`."""
    return sorted(_manifest())


def pretrained(name: str) -> nn.Module:
    """A shipped pretrained model, in eval mode on the CPU, in float32.

    The checkpoint's sha256 is checked against the manifest before it is loaded
    (``torch.load(weights_only=True)``). :func:`pretrained_names` lists the names;
    ``recon/assets/pretrained.json`` says how each was trained and how accurate it is.

    Parameters
    ----------
    name : str
        For example ``"vgg16_fmnist"``.

    Returns
    -------
    nn.Module
    """
    manifest = _manifest()
    if name not in manifest:
        raise ValueError(
            f"The 'name' argument must be one of {sorted(manifest)}. Got {name!r} instead."
        )
    entry = manifest[name]
    path = PRETRAINED_MANIFEST.parent / entry["file"]
    if not path.exists():
        raise FileNotFoundError(
            f"The checkpoint of {name!r} is missing at {path}; regenerate it with "
            f"`{entry.get('command', 'python scripts/train.py ' + name)}`."
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(
            f"The checkpoint of {name!r} at {path} is damaged: sha256 {digest}, expected "
            f"{entry['sha256']} (from {PRETRAINED_MANIFEST.name})."
        )
    builders = {
        "vgg16": vgg16,
        "cifar_resnet20": cifar_resnet20,
        "cifar_resnet56": cifar_resnet56,
        "cifar_mobilenet_v2": cifar_mobilenet_v2,
        "cifar_convnext": cifar_convnext,
    }
    model = builders[entry["builder"]](**entry["kwargs"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
