"""Model base: every model starts with Normalize and exposes its feature map and features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backdoors.registry import Registry

MODELS: Registry[nn.Module] = Registry(
    "model", injected=("num_classes", "input_shape", "mean", "std")
)


class Normalize(nn.Module):
    """(x - mean) / std per channel, so models take pixels in [0, 1] (triggers never see
    dataset statistics). Buffers, so they move with the model and land in checkpoints."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Shared shape of every image model: normalize -> body -> pool -> head.

    Subclasses build `self.body` (pixels after Normalize -> last feature map [N, C, h, w]),
    `self.pool` (feature map -> penultimate features [N, D]) and `self.head` (a Linear
    D -> num_classes). Defenses and evasion losses use the three stages:
    `feature_map(x)` for Grad-CAM (SentiNet), `features(x)` for latent-space methods
    (spectral signatures, activation clustering), `head` for pruning and inspection.

    A model with layers fitted to data rather than trained (fast_cifar's whitening) sets
    `prepare_images` and overrides `prepare`: a run from scratch calls it once, on that
    many training images, before the first step; what it fits lives in the state dict,
    so resumed runs and defenses load it with the weights.
    """

    body: nn.Module
    pool: nn.Module
    head: nn.Linear
    prepare_images: int = 0

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.normalize = Normalize(mean, std)

    def feature_map(self, x: Tensor) -> Tensor:
        return self.body(self.normalize(x))

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.feature_map(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def feature_dim(self) -> int:
        return self.head.in_features

    def prepare(self, images: Tensor) -> None:
        """Fit data-dependent layers to training `images` (pixels in [0, 1]); by default
        there are none."""


def flat_size(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of features `module` produces for one input of `input_shape` (dry run)."""
    with torch.no_grad():
        return int(module(torch.zeros(1, *input_shape)).flatten(1).shape[1])
