"""The Backdoors 101 MNIST network and a smaller CNN for tiny inputs."""

from __future__ import annotations

from typing import Any

from torch import nn

from backdoors.models.base import MODELS, ImageClassifier, flat_size


@MODELS.register("simple_net")
class SimpleNet(ImageClassifier):
    """Backdoors 101's MNIST CNN (LeNet-style, Blind Backdoors arXiv 2005.03823).

    conv5x5(20) -> pool -> conv5x5(50) -> pool -> fc(hidden=500) -> fc(classes); 28x28 inputs
    give the original 800 -> 500 -> 10. Inputs under 16 pixels get `padding: 2` by default.
    """

    def __init__(
        self,
        hidden: int = 500,
        padding: int | None = None,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        pad = (2 if min(self.input_shape[1:]) < 16 else 0) if padding is None else padding
        self.body = nn.Sequential(
            nn.Conv2d(self.input_shape[0], 20, 5, 1, pad), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, 5, 1, pad), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.pool = nn.Sequential(
            nn.Flatten(), nn.Linear(flat_size(self.body, self.input_shape), hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, self.num_classes)


@MODELS.register("tiny_cnn")
class TinyCNN(ImageClassifier):
    """Small 3x3 CNN with batch norm for 8x8-16x16 inputs (tests, quickstart); not from a paper.

    Three conv layers (width, 2*width, 2*width; default width 16), one max-pool, a 64-unit
    hidden layer; trains in seconds on a CPU.
    """

    def __init__(
        self,
        width: int = 16,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        c = self.input_shape[0]
        self.body = nn.Sequential(  # batch norm keeps small-data training stable at high lr
            nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        features = flat_size(self.body, self.input_shape)
        self.pool = nn.Sequential(nn.Flatten(), nn.Linear(features, 64), nn.ReLU())
        self.head = nn.Linear(64, self.num_classes)
