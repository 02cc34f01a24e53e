"""ResNet-18/34/50 (He et al., "Deep Residual Learning for Image Recognition", arXiv 1512.03385).

One implementation, two stems: the CIFAR stem (3x3 conv, stride 1, no max-pool), the usual
choice for 32x32 inputs and the one in Backdoors 101's CIFAR config, and the paper's ImageNet
stem (7x7 conv, stride 2, then a 3x3 stride-2 max-pool). Shortcuts are identities, or a 1x1
conv + BN projection where the shape changes (the paper's option B).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

from torch import Tensor, nn

from backdoors.models.base import MODELS, ImageClassifier

Stem = Literal["cifar", "imagenet"]


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here feeds a BatchNorm, whose mean subtraction would cancel it.
    return nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)


def kaiming_init(model: nn.Module) -> None:
    """He-normal conv weights (fan_out, ReLU gain; He et al., arXiv 1502.01852), as in the
    reference ImageNet training code. BatchNorm and Linear keep PyTorch's defaults."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def make_stem(stem: Stem, in_channels: int, width: int) -> nn.Sequential:
    """Input layers before the first residual stage: CIFAR keeps full resolution, ImageNet
    divides it by 4."""
    if stem == "cifar":
        return nn.Sequential(conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU())
    if stem == "imagenet":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    raise ValueError(f"unknown ResNet stem {stem!r}; expected 'cifar' or 'imagenet'")


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity when the shapes match, otherwise a strided 1x1 conv + BN."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class ResidualBlock(nn.Module):
    """relu(residual(x) + shortcut(x)); subclasses build `residual`, ending in a BatchNorm."""

    expansion: int
    residual: nn.Sequential
    shortcut: nn.Module

    def __init__(self) -> None:
        super().__init__()
        # Not in-place: defenses hook block outputs, and in-place ops break backward hooks.
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            conv3x3(in_planes, planes, stride), nn.BatchNorm2d(planes), nn.ReLU(),
            conv3x3(planes, planes), nn.BatchNorm2d(planes),
        )
        self.shortcut = projection(in_planes, planes, stride)


class Bottleneck(ResidualBlock):
    """1x1 reduce -> 3x3 -> 1x1 expand by 4 (ResNet-50). The stride sits on the 3x3 conv
    (the widely used "v1.5" placement; the paper strides the first 1x1). Same parameters."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.residual = nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
            conv3x3(planes, planes, stride), nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes),
        )
        self.shortcut = projection(in_planes, out_planes, stride)


class ResNet(ImageClassifier):
    """Shared ResNet: registered subclasses fix `block`, `layers` (blocks per stage) and
    `stem`. Stage i has `width * 2**i` planes; stages 2-4 halve the resolution.

    `body` is `stem -> layer1 -> ... -> layer4` (named, so pruning defenses can address
    `body.layer4`); `pool` is global average pooling; `head` the final Linear.
    `zero_init_residual` zeroes each block's last BN scale so blocks start as identities
    (Goyal et al., arXiv 1706.02677); off by default, as in the paper.
    """

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]
    stem: Stem = "cifar"

    def __init__(
        self,
        width: int = 64,
        zero_init_residual: bool = False,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        stages["stem"] = make_stem(self.stem, self.input_shape[0], width)
        in_planes = width
        for i, num_blocks in enumerate(self.layers):
            planes = width * 2**i
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(self.block(in_planes, planes, stride))
                in_planes = planes * self.block.expansion
            stages[f"layer{i + 1}"] = nn.Sequential(*blocks)
        self.body = nn.Sequential(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(in_planes, self.num_classes)
        kaiming_init(self)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, ResidualBlock):
                    nn.init.zeros_(module.residual[-1].weight)


@MODELS.register("resnet18")
class ResNet18(ResNet):
    """ResNet-18 (He et al., "Deep Residual Learning", arXiv 1512.03385) with a CIFAR stem.

    BasicBlocks [2, 2, 2, 2]; 3x3 stride-1 stem, no max-pool, so 32x32 inputs end in a 4x4
    map. Defaults: width 64, zero_init_residual off (11,173,962 parameters at 10 classes).
    """

    block = BasicBlock
    layers = (2, 2, 2, 2)


@MODELS.register("resnet34")
class ResNet34(ResNet):
    """ResNet-34 (He et al., "Deep Residual Learning", arXiv 1512.03385) with a CIFAR stem.

    BasicBlocks [3, 4, 6, 3]; 3x3 stride-1 stem, no max-pool. Defaults: width 64,
    zero_init_residual off.
    """

    block = BasicBlock
    layers = (3, 4, 6, 3)


@MODELS.register("resnet50")
class ResNet50(ResNet):
    """ResNet-50 (He et al., "Deep Residual Learning", arXiv 1512.03385) with a CIFAR stem.

    Bottlenecks [3, 4, 6, 3] (2048 features at width 64); 3x3 stride-1 stem, no max-pool.
    Defaults: width 64, zero_init_residual off.
    """

    block = Bottleneck
    layers = (3, 4, 6, 3)


@MODELS.register("resnet18_imagenet")
class ResNet18ImageNet(ResNet18):
    """ResNet-18 (He et al., "Deep Residual Learning", arXiv 1512.03385), ImageNet stem.

    7x7 stride-2 conv + max-pool stem, so 224x224 inputs end in a 7x7 map. Defaults:
    width 64, zero_init_residual off.
    """

    stem = "imagenet"


@MODELS.register("resnet34_imagenet")
class ResNet34ImageNet(ResNet34):
    """ResNet-34 (He et al., "Deep Residual Learning", arXiv 1512.03385), ImageNet stem.

    7x7 stride-2 conv + max-pool stem. Defaults: width 64, zero_init_residual off.
    """

    stem = "imagenet"


@MODELS.register("resnet50_imagenet")
class ResNet50ImageNet(ResNet50):
    """ResNet-50 (He et al., "Deep Residual Learning", arXiv 1512.03385), ImageNet stem.

    7x7 stride-2 conv + max-pool stem. Defaults: width 64, zero_init_residual off
    (25,557,032 parameters at 1000 classes, the paper's model).
    """

    stem = "imagenet"
