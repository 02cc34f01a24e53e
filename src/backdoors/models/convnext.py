"""ConvNeXt-T (Liu et al., "A ConvNet for the 2020s", CVPR 2022, arXiv 2201.03545).

A ResNet modernised step by step towards a Swin Transformer: a 4x4 stride-4 "patchify"
stem, stages of (3, 3, 9, 3) blocks at widths (96, 192, 384, 768), each block a 7x7
depthwise conv -> LayerNorm -> 4x MLP with GELU -> layer scale, on an identity shortcut
with stochastic depth; LayerNorm + 2x2 stride-2 conv between stages.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backdoors.models.base import MODELS, ImageClassifier
from backdoors.models.blocks import LayerNorm2d, StochasticDepth, check_width_scale

EPS = 1e-6  # the paper's LayerNorm epsilon


class ConvNeXtBlock(nn.Module):
    """dwconv7x7 -> LN -> Linear 4x -> GELU -> Linear -> gamma * (.) -> drop path, + x.

    The LayerNorm and the MLP run channels-last, where LayerNorm and Linear are the plain
    PyTorch layers; `gamma` (layer scale, Touvron et al., arXiv 2103.17239) starts at
    `layer_scale` so each block starts close to the identity.
    """

    def __init__(self, dim: int, layer_scale: float, drop: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop = StochasticDepth(drop)

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1))) * self.gamma
        return x + self.drop(out.permute(0, 3, 1, 2))


class Downsample(nn.Module):
    """Channels-first LayerNorm -> 2x2 stride-2 conv. An odd-sized map is zero-padded on
    the right and bottom first, so small inputs (28x28 MNIST: 7 -> 4 -> 2 -> 1) never
    shrink to nothing; even sizes, all of them at 224 or 32, are untouched."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=EPS)
        self.conv = nn.Conv2d(in_dim, out_dim, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return self.conv(F.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2)))


@MODELS.register("convnext_tiny")
class ConvNeXtTiny(ImageClassifier):
    """ConvNeXt-T (Liu et al., "A ConvNet for the 2020s", CVPR 2022, arXiv 2201.03545).

    `body`: stem (4x4 stride-4 conv + channels-first LN) -> stage 1 -> (downsample ->
    stage) x 3: `feature_map`, 768 channels at 1/32 of the input side (224 -> 7, 32 -> 1;
    the paper's stem for every input, odd maps padded before each downsample). `pool`:
    global average pool -> LayerNorm; `head`: Linear 768 -> classes. Block i of 18 drops
    its branch with probability `drop_path * i / 17` in training (linear schedule).
    Defaults: width_scale 1.0 (scales the four widths), layer_scale 1e-6, drop_path 0.1
    (28,589,128 parameters at 1000 classes, as torchvision's convnext_tiny).
    """

    depths = (3, 3, 9, 3)
    dims = (96, 192, 384, 768)

    def __init__(self, width_scale: float = 1.0, layer_scale: float = 1e-6,
                 drop_path: float = 0.1, **base: Any) -> None:
        super().__init__(**base)
        check_width_scale(width_scale)
        dims = [max(1, round(d * width_scale)) for d in self.dims]
        total = sum(self.depths)
        layers: list[nn.Module] = [
            nn.Conv2d(self.input_shape[0], dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=EPS)
        ]
        index = 0
        for i, (depth, dim) in enumerate(zip(self.depths, dims, strict=True)):
            if i > 0:
                layers.append(Downsample(dims[i - 1], dim))
            blocks = []
            for _ in range(depth):
                blocks.append(ConvNeXtBlock(dim, layer_scale, drop_path * index / (total - 1)))
                index += 1
            layers.append(nn.Sequential(*blocks))
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1], eps=EPS)
        )
        self.head = nn.Linear(dims[-1], self.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The paper's init: truncated normal (std 0.02) weights and zero biases for every
        # conv and Linear, as in Swin/DeiT.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
