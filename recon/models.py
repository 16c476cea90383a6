"""CIFAR-style model definitions used by the scripts, the CLI and the tests.

The architectures follow torchvision's conventions: helpers first, the architecture as
data (a VGG is a list such as ``[64, 64, "M", 128, ...]``), then the model class, then
thin keyword-only builders. A pruned VGG is simply another such list, which makes the
configuration lists the natural way to describe a pruning plan.

Unlike torchvision's ImageNet VGG, the CIFAR variant has no adaptive pooling, no
dropout and a single linear classifier: the feature map after the last pooling layer
is flattened straight into ``nn.Linear(channels * s * s, num_classes)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "VGG",
    "VGG_CFGS",
    "digits_vgg",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
]

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, *, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1 (spatial size preserved)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, padding=1, bias=bias)


def _scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width``, at least 1."""
    return max(1, round(channels * width))


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"The {name!r} parameter must be an int >= 1. Got {value!r} instead.")
    return value


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
