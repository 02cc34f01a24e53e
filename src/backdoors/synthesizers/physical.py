"""Physical-world trigger: an object pasted at a random scale, angle, brightness and place."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer
from backdoors.synthesizers.images import TriggerImage, resize

Shape = Literal["square", "circle", "glasses", "star"]
BASE = 64  # built-in shapes are drawn at this resolution, then shrunk with antialiasing


def draw_shape(shape: Shape, size: int = BASE) -> Tensor:
    """[1, h, w] mask of a built-in shape drawn on a size x size canvas [-1, 1]^2."""
    t = (torch.arange(size) + 0.5) * (2 / size) - 1
    v, u = torch.meshgrid(t, t, indexing="ij")  # v grows downwards, u to the right
    if shape == "square":
        mask = torch.ones(size, size, dtype=torch.bool)
    elif shape == "circle":
        mask = u**2 + v**2 <= 1
    elif shape == "glasses":  # two round frames joined by a bridge
        frames = [torch.hypot(u - dx, v) for dx in (-0.55, 0.55)]
        mask = ((frames[0] - 0.38).abs() <= 0.07) | ((frames[1] - 0.38).abs() <= 0.07)
        mask |= (u.abs() <= 0.2) & ((v + 0.1).abs() <= 0.05)
    else:  # star: five points of radius 1, inner corners at radius 0.4, one point up
        corners = torch.arange(11) * (math.pi / 5) + math.pi / 2
        radii = torch.where(torch.arange(11) % 2 == 0, 1.0, 0.4)
        px, py = radii * torch.cos(corners), radii * torch.sin(corners)
        y = -v  # y up, so corners run counter-clockwise and the origin is on each edge's left
        sector = (torch.atan2(y, u) - math.pi / 2).remainder(2 * math.pi) // (math.pi / 5)
        a, b = sector.long(), sector.long() + 1
        cross = (px[b] - px[a]) * (y - py[a]) - (py[b] - py[a]) * (u - px[a])
        mask = cross >= 0
    # Crop to the drawn part, so that `scale` measures the visible object (glasses are wide).
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].float()[None]


@SYNTHESIZERS.register("physical")
class PhysicalSynthesizer(Synthesizer):
    """An object pasted with random pose and lighting (arXiv 2005.03823, 2006.14580).

    Blind Backdoors (Bagdasaryan & Shmatikov, arXiv 2005.03823) and Wenger et al., "Backdoor
    Attacks Against Deep Learning Systems in the Physical World" (arXiv 2006.14580): the
    object is pasted on each image with its own random pose, to emulate photos of a real
    sticker or pair of glasses.

    The object is the picture at `image` (a file; its alpha channel, if any, is the mask)
    or a built-in `shape` (square, default, circle, glasses or star) filled with grey level
    `color` (default 1.0, white). Per sample, drawn from the generator: its longer side is
    a `scale` fraction of the image side (default 0.15-0.3), it is rotated by up to
    `max_rotation` degrees either way (default 20), its values are multiplied by a
    `brightness` factor (default 0.7-1.3) and it is placed anywhere it fits. All samples are
    pasted at once with one affine_grid / grid_sample call; compositing uses premultiplied
    alpha so the object's edges stay clean.
    """

    def __init__(
        self,
        shape: Shape = "square",
        image: str | None = None,
        color: float = 1.0,
        scale: tuple[float, float] = (0.15, 0.3),
        max_rotation: float = 20.0,
        brightness: tuple[float, float] = (0.7, 1.3),
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {list(scale)}")
        if not 0 <= brightness[0] <= brightness[1]:
            raise ValueError(f"brightness must satisfy 0 <= min <= max, got {list(brightness)}")
        if not 0 <= max_rotation <= 180 or not 0 <= color <= 1:
            raise ValueError("max_rotation must be in [0, 180] and color in [0, 1]")
        self.shape, self.image_path, self.color = shape, image, color
        self.scale, self.max_rotation, self.brightness = scale, max_rotation, brightness
        self.picture = None if image is None else TriggerImage.read(image)
        self.stack = torch.empty(0)

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        c, h, w = self.input_shape
        if self.picture is None:
            mask = draw_shape(self.shape)
            values = torch.full((c, *mask.shape[1:]), self.color)
        else:
            mask, values = self.picture.mask(), self.picture.image(c)
        th, tw = mask.shape[1:]
        # Largest pose: the rotated bounding box of the biggest object must fit the image.
        longest = self.scale[1] * min(h, w)
        angles = torch.linspace(0, math.radians(self.max_rotation), 181)
        lw, lh = longest * tw / max(th, tw), longest * th / max(th, tw)
        box_w = (lw * angles.cos().abs() + lh * angles.sin().abs()).max()
        box_h = (lw * angles.sin().abs() + lh * angles.cos().abs()).max()
        if box_w > w or box_h > h:
            raise ValueError(f"a {lh:.1f}x{lw:.1f} px trigger rotated up to {self.max_rotation} "
                             f"degrees does not fit {h}x{w} images; lower scale or max_rotation")
        if self.scale[0] * min(h, w) < 1:
            raise ValueError(f"scale {self.scale[0]} makes the trigger under one pixel in {h}x{w}"
                             " images; raise scale")
        # Premultiplied colour + mask, pre-shrunk (antialiased) to the largest pasted size so
        # grid_sample never has to skip over many source pixels.
        stack = torch.cat([values * mask, mask])
        factor = min(1.0, math.ceil(longest) / max(th, tw))
        self.stack = resize(stack, (max(1, round(th * factor)), max(1, round(tw * factor))))

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        assert self.stack.numel(), "bind() the synthesizer to a task first"
        n, _, h, w = x.shape
        th, tw = self.stack.shape[1:]
        draws = torch.rand((n, 5), generator=generator, dtype=torch.float64)
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * draws[:, 0]
        angle = math.radians(self.max_rotation) * (2 * draws[:, 1] - 1)
        gain = self.brightness[0] + (self.brightness[1] - self.brightness[0]) * draws[:, 2]
        lw = scale * min(h, w) * tw / max(th, tw)
        lh = scale * min(h, w) * th / max(th, tw)
        cos, sin = angle.cos(), angle.sin()
        box_w, box_h = lw * cos.abs() + lh * sin.abs(), lw * sin.abs() + lh * cos.abs()
        cx = box_w / 2 + draws[:, 3] * (w - box_w)  # object centre, in pixels
        cy = box_h / 2 + draws[:, 4] * (h - box_h)
        # Output pixel (px, py) = ((gx + 1) w / 2, (gy + 1) h / 2) for grid coords (gx, gy);
        # rotate (px - cx, py - cy) by -angle and divide by the half sizes to land in the
        # object's own [-1, 1] coordinates. Everything is affine in (gx, gy).
        ox, oy = w / 2 - cx, h / 2 - cy
        theta = torch.stack([
            torch.stack([cos * w / 2, sin * h / 2, cos * ox + sin * oy], -1) / (lw / 2)[:, None],
            torch.stack([-sin * w / 2, cos * h / 2, -sin * ox + cos * oy], -1) / (lh / 2)[:, None],
        ], 1).to(x.device, x.dtype)
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        stack = self.stack.to(x.device, x.dtype).expand(n, -1, -1, -1)
        pasted = F.grid_sample(stack, grid, mode="bilinear", align_corners=False)
        paint, mask = pasted[:, :-1], pasted[:, -1:]
        # Premultiplied, so "colour <= 1" reads "paint <= mask".
        paint = torch.minimum(paint * gain.to(x.device, x.dtype).view(n, 1, 1, 1), mask)
        return x * (1 - mask) + paint

    def state_tensors(self) -> dict[str, Tensor]:
        return {"object": self.stack}

    def spec(self) -> dict:
        return {**super().spec(), "shape": self.shape, "image": self.image_path,
                "color": self.color, "scale": list(self.scale),
                "max_rotation": self.max_rotation, "brightness": list(self.brightness)}
