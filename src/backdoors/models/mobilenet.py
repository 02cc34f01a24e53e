"""MobileNetV3-Large and -Small (Howard et al., "Searching for MobileNetV3", ICCV 2019,
arXiv 1905.02244).

Inverted residual blocks (1x1 expand -> depthwise kxk -> optional squeeze-excitation ->
1x1 linear projection, identity shortcut where the shape allows), ReLU in the early blocks
and hard-swish in the later ones, the blocks found by the paper's architecture search
(its Tables 1 and 2). Channel counts go through `make_divisible`, so a `width_scale`
multiplier keeps every layer a multiple of 8.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from backdoors.models.base import MODELS, ImageClassifier
from backdoors.models.blocks import (
    Activation,
    SqueezeExcitation,
    check_width_scale,
    conv_bn_act,
    grouped_fan_out_init,
    make_divisible,
)

# The reference models' BatchNorm epsilon (TensorFlow's default, kept by the paper's code).
BN_EPS = 1e-3


class Bneck(NamedTuple):
    """One row of the paper's tables: kernel, expansion width, output width, SE, hard-swish
    (else ReLU), stride."""

    kernel: int
    expanded: int
    out: int
    se: bool
    hswish: bool
    stride: int


class InvertedResidual(nn.Module):
    """MobileNetV3 block ("bneck"): expand -> depthwise -> SE -> project (+ input)."""

    def __init__(self, in_channels: int, spec: Bneck, width_scale: float) -> None:
        super().__init__()
        expanded = make_divisible(spec.expanded * width_scale)
        out = make_divisible(spec.out * width_scale)
        act: Activation = nn.Hardswish if spec.hswish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != in_channels:  # the first block of Large has no expansion
            layers.append(conv_bn_act(in_channels, expanded, 1, act=act, eps=BN_EPS))
        layers.append(conv_bn_act(expanded, expanded, spec.kernel, spec.stride, groups=expanded,
                                  act=act, eps=BN_EPS))
        if spec.se:
            # Squeeze to a quarter of the expanded width (rounded to 8), hard-sigmoid gate.
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), nn.ReLU,
                                            nn.Hardsigmoid))
        layers.append(conv_bn_act(expanded, out, 1, eps=BN_EPS))  # linear bottleneck
        self.block = nn.Sequential(*layers)
        self.residual = spec.stride == 1 and in_channels == out
        self.out_channels = out

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3(ImageClassifier):
    """Shared MobileNetV3: registered subclasses fix `blocks` and `last_hidden`.

    `body`: 3x3 stride-2 stem (16 channels, hard-swish) -> the bnecks -> a 1x1 conv to
    6x the last bneck's width (hard-swish): `feature_map`, 1/32 of the input side.
    `pool`: global average pool -> Linear to `last_hidden` -> hard-swish -> dropout;
    `head`: Linear to the classes. The paper's ImageNet stem is kept for every input size
    (32x32 ends in a 1x1 map, 28x28 MNIST too; strided convs pad, so nothing goes to zero).
    """

    blocks: tuple[Bneck, ...]
    last_hidden: int

    def __init__(self, width_scale: float = 1.0, dropout: float = 0.2, **base: Any) -> None:
        super().__init__(**base)
        check_width_scale(width_scale)
        channels = make_divisible(16 * width_scale)
        layers: list[nn.Module] = [
            conv_bn_act(self.input_shape[0], channels, 3, 2, act=nn.Hardswish, eps=BN_EPS)
        ]
        for spec in self.blocks:
            block = InvertedResidual(channels, spec, width_scale)
            layers.append(block)
            channels = block.out_channels
        last_conv = 6 * channels
        layers.append(conv_bn_act(channels, last_conv, 1, act=nn.Hardswish, eps=BN_EPS))
        self.body = nn.Sequential(*layers)
        hidden = make_divisible(self.last_hidden * width_scale)
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last_conv, hidden), nn.Hardswish(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, self.num_classes)
        grouped_fan_out_init(self)


@MODELS.register("mobilenet_v3_large")
class MobileNetV3Large(MobileNetV3):
    """MobileNetV3-Large (Howard et al., "Searching for MobileNetV3", ICCV 2019,
    arXiv 1905.02244, Table 1).

    15 bnecks, last conv 960 channels, hidden 1280. Defaults: width_scale 1.0, dropout 0.2
    (5,483,032 parameters at 1000 classes, as torchvision's mobilenet_v3_large).
    """

    blocks = (
        Bneck(3, 16, 16, False, False, 1),
        Bneck(3, 64, 24, False, False, 2),
        Bneck(3, 72, 24, False, False, 1),
        Bneck(5, 72, 40, True, False, 2),
        Bneck(5, 120, 40, True, False, 1),
        Bneck(5, 120, 40, True, False, 1),
        Bneck(3, 240, 80, False, True, 2),
        Bneck(3, 200, 80, False, True, 1),
        Bneck(3, 184, 80, False, True, 1),
        Bneck(3, 184, 80, False, True, 1),
        Bneck(3, 480, 112, True, True, 1),
        Bneck(3, 672, 112, True, True, 1),
        Bneck(5, 672, 160, True, True, 2),
        Bneck(5, 960, 160, True, True, 1),
        Bneck(5, 960, 160, True, True, 1),
    )
    last_hidden = 1280


@MODELS.register("mobilenet_v3_small")
class MobileNetV3Small(MobileNetV3):
    """MobileNetV3-Small (Howard et al., "Searching for MobileNetV3", ICCV 2019,
    arXiv 1905.02244, Table 2).

    11 bnecks, last conv 576 channels, hidden 1024. Defaults: width_scale 1.0, dropout 0.2
    (2,542,856 parameters at 1000 classes, as torchvision's mobilenet_v3_small).
    """

    blocks = (
        Bneck(3, 16, 16, True, False, 2),
        Bneck(3, 72, 24, False, False, 2),
        Bneck(3, 88, 24, False, False, 1),
        Bneck(5, 96, 40, True, True, 2),
        Bneck(5, 240, 40, True, True, 1),
        Bneck(5, 240, 40, True, True, 1),
        Bneck(5, 120, 48, True, True, 1),
        Bneck(5, 144, 48, True, True, 1),
        Bneck(5, 288, 96, True, True, 2),
        Bneck(5, 576, 96, True, True, 1),
        Bneck(5, 576, 96, True, True, 1),
    )
    last_hidden = 1024
