"""VGG-11, VGG-16 and VGG-19 with batch norm (Simonyan & Zisserman, "Very Deep Convolutional
Networks for Large-Scale Image Recognition", ICLR 2015, arXiv 1409.1556).

BN follows every 3x3 conv. Two classifiers: the CIFAR form (global average pooling and one
Linear, as kuangliu/pytorch-cifar and BackdoorBench use for 32x32 inputs) and the paper's
ImageNet form (7x7 adaptive average pool, two 4096-wide Linear + ReLU + dropout layers,
then the Linear to the classes). `classifier: auto` picks ImageNet for inputs of 224
pixels or more and CIFAR below.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from backdoors.models.base import MODELS, ImageClassifier
from backdoors.models.resnet import kaiming_init

POOL = "M"
"""Marker for a 2x2 max-pool in a layer configuration (the paper's tables' "maxpool")."""


class VGG(ImageClassifier):
    """Shared VGG-BN: registered subclasses fix `config` (conv widths and POOL markers).

    Each conv is 3x3 -> BN -> ReLU with `round(width * width_scale)` channels. A max-pool is
    skipped when the map is already 1 pixel wide, so 28x28 inputs (4 halvings) work as well
    as 32x32 (5). `feature_map` is the output of the last max-pool. CIFAR classifier:
    `pool` is global average pooling, `head` one Linear. ImageNet classifier: `pool` is
    adaptive average pooling to 7x7, flatten, then twice Linear (4096 * width_scale wide)
    -> ReLU -> dropout (`dropout`, default 0.5); `head` the last Linear.
    """

    config: tuple[int | str, ...]

    def __init__(
        self,
        width_scale: float = 1.0,
        classifier: Literal["auto", "cifar", "imagenet"] = "auto",
        dropout: float = 0.5,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if width_scale <= 0:
            raise ValueError(f"width_scale must be positive, got {width_scale}")
        if classifier not in ("auto", "cifar", "imagenet"):
            raise ValueError(f"classifier must be auto, cifar or imagenet, got {classifier!r}")
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
        if classifier == "auto":
            classifier = "imagenet" if min(self.input_shape[1:]) >= 224 else "cifar"
        if classifier == "cifar":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(channels, self.num_classes)
        else:
            hidden = max(1, round(4096 * width_scale))
            self.pool = nn.Sequential(
                nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                nn.Linear(channels * 49, hidden), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            )
            self.head = nn.Linear(hidden, self.num_classes)
        kaiming_init(self)


@MODELS.register("vgg11")
class VGG11(VGG):
    """VGG-11 with BN (Simonyan & Zisserman, ICLR 2015, arXiv 1409.1556, config A).

    8 convs 64-M-128-M-256x2-M-512x2-M-512x2-M; below 224 pixels global average pool and
    Linear 512 -> classes. Defaults: width_scale 1.0, classifier auto, dropout 0.5.
    """

    config = (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL)


@MODELS.register("vgg16")
class VGG16(VGG):
    """VGG-16 with BN (Simonyan & Zisserman, ICLR 2015, arXiv 1409.1556, config D).

    13 convs 64x2-M-128x2-M-256x3-M-512x3-M-512x3-M; below 224 pixels global average pool
    and Linear 512 -> classes. Defaults: width_scale 1.0, classifier auto, dropout 0.5
    (14,724,042 parameters at 10 classes on 32x32).
    """

    config = (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL,
        512, 512, 512, POOL, 512, 512, 512, POOL,
    )


@MODELS.register("vgg19_bn")
class VGG19BN(VGG):
    """VGG-19 with BN (Simonyan & Zisserman, "Very Deep Convolutional Networks for
    Large-Scale Image Recognition", ICLR 2015, arXiv 1409.1556, config E).

    16 convs 64x2-M-128x2-M-256x4-M-512x4-M-512x4-M. Inputs under 224 pixels (32x32 CIFAR
    and GTSRB, 64x64 Tiny-ImageNet, 28x28 MNIST) get the CIFAR classifier (global average
    pool, Linear 512 -> classes: 20,035,018 parameters at 10 classes); 224x224 inputs the
    ImageNet one (7x7 pool, 4096 -> 4096 -> classes). Defaults: width_scale 1.0,
    classifier auto, dropout 0.5: 143,672,744 parameters at 1000 classes and 224x224,
    torchvision's vgg19_bn (143,678,248) less the 5,504 conv biases that BN cancels.
    """

    config = (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
        512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
    )
