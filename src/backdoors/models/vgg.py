"""VGG-11 and VGG-16 with batch norm (Simonyan & Zisserman, "Very Deep Convolutional Networks
for Large-Scale Image Recognition", arXiv 1409.1556), in the CIFAR form.

CIFAR form: the 3x3 conv stack is kept, the three 4096-wide fully connected layers are
replaced by global average pooling and one Linear, and BN follows every conv.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from backdoors.models.base import MODELS, ImageClassifier
from backdoors.models.resnet import kaiming_init

POOL = "M"
"""Marker for a 2x2 max-pool in a layer configuration (the paper's tables' "maxpool")."""


class VGG(ImageClassifier):
    """Shared VGG-BN: registered subclasses fix `config` (conv widths and POOL markers).

    Each conv is 3x3 -> BN -> ReLU with `round(width * width_scale)` channels. A max-pool is
    skipped when the map is already 1 pixel wide, so 28x28 inputs (4 halvings) work as well
    as 32x32 (5). `pool` is global average pooling, `head` one Linear.
    """

    config: tuple[int | str, ...]

    def __init__(
        self,
        width_scale: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if width_scale <= 0:
            raise ValueError(f"width_scale must be positive, got {width_scale}")
        layers: list[nn.Module] = []
        channels = self.input_shape[0]
        size = min(self.input_shape[1:])
        for item in self.config:
            if item == POOL:
                if size >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
                continue
            out = max(1, round(int(item) * width_scale))
            # No conv bias: BN's mean subtraction cancels it, so it would never get a
            # gradient (the torchvision/kuangliu versions keep one; see the test's count).
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()
            ]
            channels = out
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, self.num_classes)
        kaiming_init(self)


@MODELS.register("vgg11")
class VGG11(VGG):
    """VGG-11 with BN (Simonyan & Zisserman, arXiv 1409.1556, config A), CIFAR form.

    8 convs 64-M-128-M-256x2-M-512x2-M-512x2-M, global average pool, Linear 512 -> classes.
    Default: width_scale 1.0.
    """

    config = (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL)


@MODELS.register("vgg16")
class VGG16(VGG):
    """VGG-16 with BN (Simonyan & Zisserman, arXiv 1409.1556, config D), CIFAR form.

    13 convs 64x2-M-128x2-M-256x3-M-512x3-M-512x3-M, global average pool, Linear 512 ->
    classes. Default: width_scale 1.0 (14,724,042 parameters at 10 classes).
    """

    config = (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL,
        512, 512, 512, POOL, 512, 512, 512, POOL,
    )
