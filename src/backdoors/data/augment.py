"""Batched augmentation on tensors: random crop with zero padding and horizontal flip.

Replaces per-sample PIL transforms (RandomCrop(32, padding=4) + RandomHorizontalFlip);
one call handles the whole batch with a few tensor ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(
    x: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Randomly shift each image by up to `padding` pixels (zero fill) and flip half of them.

    Equivalent to padding by `padding` and cropping back to the original size at a uniform
    offset, done as one gather instead of N crops.
    """
    n, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        # Offsets drawn on the CPU generator so results do not depend on the device.
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])  # [N, H]
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])  # [N, W]
        c = x.shape[1]
        padded = padded.gather(2, rows[:, None, :, None].expand(-1, c, -1, w + 2 * padding))
        x = padded.gather(3, cols[:, None, None, :].expand(-1, c, h, -1))
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def crop_flip(padding: int = 4) -> Callable[[Tensor, torch.Generator], Tensor]:
    """The training augmentation of natural-image tasks: shifts of up to `padding` pixels
    and flips, drawn from the loader's generator."""
    return lambda x, g: random_crop_flip(x, padding, generator=g)
