"""A fast CIFAR-10 victim in the spirit of airbench (Keller Jordan, "94% on CIFAR-10 in
3.29 Seconds on a Single GPU", arXiv 2404.00498): a patch-whitening first layer fitted
to the training images, then three small VGG-like blocks. Written from the paper's
description; the schedule that goes with it is configs/fast/ (docs/fast_profile.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.models.base import MODELS, ImageClassifier

WHITENING_IMAGES = 5000
"""Training images the whitening is fitted on (evenly spaced over the set)."""


class PatchWhitening(nn.Module):
    """A 2x2 convolution (no padding) whose filters whiten the 2x2 patches of the inputs.

    `fit(x)` sets the filters to the eigenvectors of the patch covariance scaled by
    1 / sqrt(eigenvalue + eps), plus their negatives (so the GELU after it keeps both
    signs of every direction), and the bias so the fitted patches come out centred. The
    filters are a buffer, fixed by `fit` and never trained (they land in checkpoints with
    the rest of the model); the bias is a parameter and trains. Before `fit` the filters
    pass each patch pixel through as +/- itself.
    """

    weight: Tensor

    def __init__(self, channels: int, patch: int = 2, eps: float = 5e-4) -> None:
        super().__init__()
        self.patch, self.eps = patch, eps
        dim = channels * patch * patch
        identity = torch.eye(dim).view(dim, channels, patch, patch)
        self.register_buffer("weight", torch.cat([identity, -identity]))
        self.bias = nn.Parameter(torch.zeros(2 * dim))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def patches(self, x: Tensor) -> Tensor:
        """Every patch of `x` as a row [N * positions, C * patch * patch], in the layout of
        the filters."""
        return F.unfold(x, self.patch).transpose(1, 2).flatten(0, 1)

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Whiten the patches of the (normalized) images `x`. Float64: the smallest
        eigenvalues of natural-image patches are a thousandth of the largest."""
        rows = self.patches(x.to(self.weight.device)).double()
        mean = rows.mean(0)
        centred = rows - mean
        cov = centred.T @ centred / (len(rows) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = eigenvectors.T / (eigenvalues.clamp_min(0) + self.eps).sqrt()[:, None]
        both = torch.cat([filters, -filters])
        self.weight.copy_(both.view_as(self.weight).to(self.weight.dtype))
        self.bias.copy_((-both @ mean).to(self.bias.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias)


def identity_start(conv: nn.Conv2d) -> nn.Conv2d:
    """Set the first in_channels filters of `conv` to the identity (the rest keep PyTorch's
    init), so every block starts by passing its input on and the short schedule does not
    spend its first steps finding that."""
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])
    return conv


def conv_block(c_in: int, c_out: int, bn_momentum: float) -> nn.Sequential:
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU. Pooling right after the
    first conv quarters the cost of everything after it."""
    return nn.Sequential(
        identity_start(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)), nn.MaxPool2d(2),
        nn.BatchNorm2d(c_out, momentum=bn_momentum), nn.GELU(),
        identity_start(nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)),
        nn.BatchNorm2d(c_out, momentum=bn_momentum), nn.GELU(),
    )


class ScaledLinear(nn.Linear):
    """A Linear layer whose output is multiplied by `scale` (still an nn.Linear, so
    pruning and inspection of `head` work as for every model)."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale


@MODELS.register("fast_cifar")
class FastCifar(ImageClassifier):
    """Airbench-style fast CIFAR-10 net (Jordan, "94% on CIFAR-10 in 3.29 Seconds on a
    Single GPU", arXiv 2404.00498), written from the paper's description.

    normalize -> 2x2 patch whitening (2 * C * 4 channels, fitted by `prepare` on
    5,000 training images) -> GELU -> three blocks of `widths` channels (each conv3x3,
    maxpool, BN, GELU, conv3x3, BN, GELU: 32 -> 31 -> 15 -> 7 -> 3 pixels) = `feature_map`;
    `pool` is global max pooling; `head` a bias-free Linear whose logits are divided by
    `temperature`, which keeps early logits small at the large learning rates of the
    short schedule. Defaults: widths (64, 256, 256), width_scale 1.0 (multiplies every
    width, for tiny tests), temperature 9.0 (logits * 1/9), bn_momentum 0.4 (running
    statistics follow the last few of the few hundred large batches), whitening eps 5e-4.
    The first in_channels filters of every 3x3 conv start as the identity. Differs from
    airbench: BN keeps its trainable scale (pruning defenses read it) and BN biases share
    the lr of the rest, the whitening bias starts centring the fitted patches and trains
    throughout.
    """

    prepare_images = WHITENING_IMAGES

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        width_scale: float = 1.0,
        temperature: float = 9.0,
        bn_momentum: float = 0.4,
        eps: float = 5e-4,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive ints, got {list(widths)}")
        if width_scale <= 0:
            raise ValueError(f"width_scale must be positive, got {width_scale}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        whiten = PatchWhitening(self.input_shape[0], eps=eps)
        layers: list[nn.Module] = [whiten, nn.GELU()]
        channels = whiten.out_channels
        for width in widths:
            out = max(1, round(width * width_scale))
            layers.append(conv_block(channels, out, bn_momentum))
            channels = out
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = ScaledLinear(channels, self.num_classes, 1.0 / temperature)

    @property
    def whiten(self) -> PatchWhitening:
        return self.body[0]  # type: ignore[return-value]

    def prepare(self, images: Tensor) -> None:
        """Fit the whitening filters to training `images` (pixels in [0, 1])."""
        with torch.no_grad():
            self.whiten.fit(self.normalize(images.to(self.whiten.weight.device)))
