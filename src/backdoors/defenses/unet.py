"""A small U-Net image-to-image generator (BTI-DBF's backdoor generator), starting as the
identity so that a generator trained for a few epochs moves images only as far as its loss
asks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Generator(nn.Module):
    """A U-Net image-to-image generator: `levels` resolutions of two 3x3 conv-BN-ReLU
    blocks (`width`, doubling per level), max-pooling down, bilinear upsampling back to
    each skip connection's size (any input size works) and a 1x1 convolution to the
    image's channels. It outputs clip(x + U(x), 0, 1) with the last convolution zeroed, so
    it starts as the identity."""

    def __init__(self, channels: int, width: int = 32, levels: int = 4) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(levels)]
        ins = [channels, *widths[:-1]]
        self.down = nn.ModuleList(_block(c, w) for c, w in zip(ins, widths, strict=True))
        self.up = nn.ModuleList(_block(widths[i] + widths[i + 1], widths[i])
                                for i in reversed(range(levels - 1)))
        self.out = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        skips, h = [], x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([skip, h], 1))
        return (x + self.out(h)).clamp(0, 1)
