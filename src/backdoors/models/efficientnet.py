"""EfficientNet-B0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019, arXiv 1905.11946).

The B0 baseline of the paper's Table 1: MBConv blocks (1x1 expand -> depthwise kxk ->
squeeze-excitation -> 1x1 linear projection, identity shortcut with stochastic depth where
the shape allows), SiLU ("swish") activations throughout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from backdoors.models.base import MODELS, ImageClassifier
from backdoors.models.blocks import (
    SqueezeExcitation,
    StochasticDepth,
    check_width_scale,
    conv_bn_act,
    grouped_fan_out_init,
    make_divisible,
)


class Stage(NamedTuple):
    """One row of the paper's Table 1: expansion ratio, kernel, first block's stride,
    output channels, number of blocks."""

    expand: int
    kernel: int
    stride: int
    out: int
    repeats: int


class MBConv(nn.Module):
    """Mobile inverted bottleneck with SE (squeeze to a quarter of the block's *input*
    width, as in the reference code) and a stochastically dropped residual branch."""

    def __init__(self, in_channels: int, out_channels: int, expand: int, kernel: int,
                 stride: int, drop: float) -> None:
        super().__init__()
        expanded = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(in_channels, expanded, 1, act=nn.SiLU))
        layers += [
            conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=nn.SiLU),
            SqueezeExcitation(expanded, max(1, in_channels // 4), nn.SiLU, nn.Sigmoid),
            conv_bn_act(expanded, out_channels, 1),  # linear bottleneck: no activation
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        # Only residual blocks can be dropped: a projecting block has no identity to keep.
        self.drop = StochasticDepth(drop if self.residual else 0.0)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return self.drop(out) + x if self.residual else out


@MODELS.register("efficientnet_b0")
class EfficientNetB0(ImageClassifier):
    """EfficientNet-B0 (Tan & Le, "EfficientNet: Rethinking Model Scaling", ICML 2019,
    arXiv 1905.11946).

    `body`: 3x3 stride-2 stem (32 channels) -> 16 MBConv blocks in 7 stages -> 1x1 conv to
    1280 channels (SiLU): `feature_map`, 1/32 of the input side (the paper's stem for every
    input size; 32x32 and 28x28 end in a 1x1 map). `pool`: global average pool -> dropout;
    `head`: Linear 1280 -> classes. Block i of 16 drops its residual branch with
    probability `drop_connect * i / 16` while training (0 to 0.1875 at the default 0.2).
    Defaults: width_scale 1.0 (channels rounded to multiples of 8), dropout 0.2,
    drop_connect 0.2 (5,288,548 parameters at 1000 classes, as torchvision's
    efficientnet_b0).
    """

    stages = (
        Stage(1, 3, 1, 16, 1),
        Stage(6, 3, 2, 24, 2),
        Stage(6, 5, 2, 40, 2),
        Stage(6, 3, 2, 80, 3),
        Stage(6, 5, 1, 112, 3),
        Stage(6, 5, 2, 192, 4),
        Stage(6, 3, 1, 320, 1),
    )

    def __init__(self, width_scale: float = 1.0, dropout: float = 0.2,
                 drop_connect: float = 0.2, **base: Any) -> None:
        super().__init__(**base)
        check_width_scale(width_scale)
        channels = make_divisible(32 * width_scale)
        layers: list[nn.Module] = [conv_bn_act(self.input_shape[0], channels, 3, 2, act=nn.SiLU)]
        total = sum(stage.repeats for stage in self.stages)
        index = 0
        for stage in self.stages:
            out = make_divisible(stage.out * width_scale)
            for j in range(stage.repeats):
                layers.append(MBConv(channels, out, stage.expand, stage.kernel,
                                     stage.stride if j == 0 else 1, drop_connect * index / total))
                channels = out
                index += 1
        last = 4 * channels  # 1280 at width 1
        layers.append(conv_bn_act(channels, last, 1, act=nn.SiLU))
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(last, self.num_classes)
        grouped_fan_out_init(self)
