"""The Backdoors 101 MNIST network and a smaller CNN for tiny inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from backdoors.models.base import MODELS, ImageClassifier, flat_size


@MODELS.register("simple_net")
class SimpleNet(ImageClassifier):
    """Backdoors 101's MNIST CNN (LeNet-style): conv5x5(20) -> pool -> conv5x5(50) -> pool ->
    fc(500) -> fc(classes). Defaults: 28x28 inputs give the original 800 -> 500 -> 10.
    Smaller inputs need `padding: 2` (used automatically below 16 pixels)."""

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        hidden: int = 500,
        padding: int | None = None,
    ) -> None:
        super().__init__(num_classes, input_shape, mean, std)
        pad = (2 if min(input_shape[1:]) < 16 else 0) if padding is None else padding
        self.body = nn.Sequential(
            nn.Conv2d(input_shape[0], 20, 5, 1, pad), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, 5, 1, pad), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.pool = nn.Sequential(
            nn.Flatten(), nn.Linear(flat_size(self.body, input_shape), hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, num_classes)


@MODELS.register("tiny_cnn")
class TinyCNN(ImageClassifier):
    """A two-layer 3x3 CNN (width 16/32, global average pooling) for 8x8-16x16 tasks and
    tests; trains in seconds on a CPU. Not from a paper."""

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 16,
    ) -> None:
        super().__init__(num_classes, input_shape, mean, std)
        self.body = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.Sequential(nn.Flatten(), nn.Linear(flat_size(self.body, input_shape), 64),
                                  nn.ReLU())
        self.head = nn.Linear(64, num_classes)
