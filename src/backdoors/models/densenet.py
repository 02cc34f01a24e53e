"""DenseNet-121 (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017,
arXiv 1608.06993).

DenseNet-BC: each layer of a dense block reads the concatenation of all earlier feature
maps of the block and adds `growth` new channels (BN -> ReLU -> 1x1 conv to
`bn_size * growth` -> BN -> ReLU -> 3x3 conv to `growth`); transitions between blocks
shrink the channels by the compression factor (0.5) with a 1x1 conv and halve the
resolution with 2x2 average pooling.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.models.base import MODELS, ImageClassifier
from backdoors.models.blocks import check_width_scale
from backdoors.models.resnet import kaiming_init


def bn_relu_conv(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    # Pre-activation order; no conv bias (the next layer's BN would cancel it).
    return [nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)]


class DenseLayer(nn.Module):
    """Bottleneck layer: returns its input with `growth` new channels appended."""

    def __init__(self, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        width = bn_size * growth
        self.layers = nn.Sequential(
            *bn_relu_conv(in_channels, width, 1), *bn_relu_conv(width, growth, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        # Concatenating layer by layer gives every later layer all earlier maps, which is
        # the dense connectivity; the block's output is simply the last concatenation.
        return torch.cat([x, self.layers(x)], dim=1)


def transition(in_channels: int, out_channels: int) -> nn.Sequential:
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool. `ceil_mode` keeps odd maps from losing
    their last row (28x28 MNIST: 7 -> 4 -> 2 -> 1 instead of 7 -> 3 -> 1 -> 0); even maps,
    as at 224 or 32, pool exactly as in the paper."""
    return nn.Sequential(*bn_relu_conv(in_channels, out_channels, 1),
                         nn.AvgPool2d(2, 2, ceil_mode=True))


@MODELS.register("densenet121")
class DenseNet121(ImageClassifier):
    """DenseNet-121 (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017,
    arXiv 1608.06993), the ImageNet DenseNet-BC.

    `body`: 7x7 stride-2 conv (2 * growth channels) -> BN -> ReLU -> 3x3 stride-2 max-pool
    -> dense blocks of (6, 12, 24, 16) layers with transitions -> BN -> ReLU:
    `feature_map`, 1024 channels at 1/32 of the input side (224 -> 7, 32 -> 1; the paper's
    ImageNet stem for every input). `pool`: global average pool; `head`: Linear 1024 ->
    classes. Defaults: width_scale 1.0 (scales the growth rate 32 and the stem's 64
    channels), bn_size 4, compression 0.5 (7,978,856 parameters at 1000 classes, as
    torchvision's densenet121).
    """

    blocks = (6, 12, 24, 16)

    def __init__(self, width_scale: float = 1.0, bn_size: int = 4, compression: float = 0.5,
                 **base: Any) -> None:
        super().__init__(**base)
        check_width_scale(width_scale)
        if bn_size < 1:
            raise ValueError(f"bn_size must be a positive integer, got {bn_size}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        growth = max(1, round(32 * width_scale))
        channels = 2 * growth
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        stages["stem"] = nn.Sequential(
            nn.Conv2d(self.input_shape[0], channels, 7, 2, 3, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        )
        for i, num_layers in enumerate(self.blocks):
            layers = []
            for _ in range(num_layers):
                layers.append(DenseLayer(channels, growth, bn_size))
                channels += growth
            stages[f"block{i + 1}"] = nn.Sequential(*layers)
            if i < len(self.blocks) - 1:
                out = max(1, int(channels * compression))
                stages[f"transition{i + 1}"] = transition(channels, out)
                channels = out
        # The blocks are pre-activation, so the last one's output gets a final BN + ReLU.
        stages["norm"] = nn.BatchNorm2d(channels)
        stages["relu"] = nn.ReLU()
        self.body = nn.Sequential(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, self.num_classes)
        kaiming_init(self)
