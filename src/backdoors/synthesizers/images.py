"""Trigger images from files: read with PIL, resized and channel-matched in torch.

Any synthesizer that takes a picture (a blend pattern, a sticker, glasses) reads it here, so
every trigger accepts the same files: PNG/JPEG/... in RGB, greyscale, or with an alpha
channel (RGBA, LA, palette with transparency), whose alpha becomes the paste mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

# ITU-R 601 luma weights, the ones PIL uses for its "L" mode.
LUMA = (0.299, 0.587, 0.114)


def resize(image: Tensor, size: Sequence[int]) -> Tensor:
    """[C, h, w] -> [C, *size], bilinear with antialiasing so that shrinking a large photo
    averages its pixels instead of sampling a few of them."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=tuple(size), mode="bilinear", antialias=True,
                        align_corners=False)[0]
    return out.clamp(0, 1)


def to_channels(rgb: Tensor, channels: int) -> Tensor:
    """[3, H, W] colour -> the task's channel count: RGB as is, otherwise luma repeated."""
    if channels == 3:
        return rgb
    luma = torch.tensor(LUMA, dtype=rgb.dtype).view(3, 1, 1)
    return (rgb * luma).sum(0, keepdim=True).clamp(0, 1).expand(channels, -1, -1).clone()


@dataclass(frozen=True)
class TriggerImage:
    """An image file as float tensors in [0, 1]: `rgb` [3, h, w] and `alpha` [1, h, w]
    (all ones for files without transparency)."""

    rgb: Tensor
    alpha: Tensor

    @classmethod
    def read(cls, path: str | Path) -> TriggerImage:
        """Read `path`; ValueError naming the file when it is missing or not an image."""
        file = Path(path).expanduser()
        try:
            with Image.open(file) as img:
                img.load()
                transparent = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                pixels = np.asarray(img.convert("RGBA" if transparent else "RGB"))
        except FileNotFoundError:
            raise ValueError(f"trigger image '{file}' does not exist") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read trigger image '{file}': {exc}") from None
        data = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
        alpha = data[3:] if transparent else torch.ones_like(data[:1])
        return cls(data[:3].contiguous(), alpha.contiguous())

    def image(self, channels: int, size: Sequence[int] | None = None) -> Tensor:
        """Colour channels converted to `channels` and resized to `size` (h, w)."""
        out = to_channels(self.rgb, channels)
        return out if size is None else resize(out, size)

    def mask(self, size: Sequence[int] | None = None) -> Tensor:
        """The alpha channel [1, h, w] (resized to `size`)."""
        return self.alpha if size is None else resize(self.alpha, size)


def load_trigger_image(
    path: str | Path, channels: int, size: Sequence[int] | None = None
) -> Tensor:
    """The image at `path` as a [channels, h, w] float tensor in [0, 1], resized to `size`
    (h, w) when given. Use `TriggerImage.read(path).mask()` for its alpha mask."""
    return TriggerImage.read(path).image(channels, size)
