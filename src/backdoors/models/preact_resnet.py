"""PreAct-ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", arXiv 1603.05027).

Pre-activation blocks run BN -> ReLU before each conv and add the shortcut without a ReLU
after it, so the identity path stays clean. BackdoorBench's reference model for CIFAR-10.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

from backdoors.models.base import MODELS, ImageClassifier
from backdoors.models.resnet import conv3x3, kaiming_init


class PreActBlock(nn.Module):
    """BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv, plus the shortcut.

    A projection shortcut (1x1 conv, no BN, as in the paper's code) reads the pre-activated
    input, because that is the tensor both paths share when the shape changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        return out + skip


@MODELS.register("preact_resnet18")
class PreActResNet18(ImageClassifier):
    """PreAct-ResNet-18 (He et al., "Identity Mappings", arXiv 1603.05027), CIFAR stem.

    A bare 3x3 conv stem (the first block pre-activates it), blocks [2, 2, 2, 2] with
    `width * 2**i` planes, and a final BN -> ReLU so `feature_map` is post-activation.
    Default: width 64 (11,172,170 parameters at 10 classes).
    """

    def __init__(
        self,
        width: int = 64,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        stages["stem"] = conv3x3(self.input_shape[0], width)
        in_planes = width
        for i in range(4):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stages[f"layer{i + 1}"] = nn.Sequential(
                PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes)
            )
            in_planes = planes
        # Pre-activation blocks leave their output un-normalized; the paper adds this final
        # BN + ReLU before pooling.
        stages["bn"] = nn.BatchNorm2d(in_planes)
        stages["relu"] = nn.ReLU()
        self.body = nn.Sequential(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(in_planes, self.num_classes)
        kaiming_init(self)
