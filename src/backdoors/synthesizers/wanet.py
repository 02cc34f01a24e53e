"""WaNet: an imperceptible, smooth warp of the whole image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.batch import Batch
from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer


@SYNTHESIZERS.register("wanet")
class WaNetSynthesizer(Synthesizer):
    """WaNet: a fixed, smooth warp of the whole image (Nguyen & Tran, arXiv 2102.10369).

    Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack": every triggered
    image is resampled through one fixed, smooth warping field.

    A k x k grid of random offsets in [-1, 1] (drawn from `seed`, default 0), normalised by
    its mean absolute value, is upsampled bicubically to H x W, scaled by `s` and divided by
    the image size, added to the identity sampling grid and clamped to [-1, 1]; images are
    resampled bilinearly (`grid_sample`, align_corners=True). Paper defaults: `k` 4, `s` 0.5.

    Noise mode (`noise: true`, off by default): the paper also trains on "noise" images,
    warped with the field plus per-pixel random offsets, that keep their true labels, so the
    model learns the exact warp rather than any warp. With the `batch` attack, after the
    round(B * fraction) backdoor rows, the next round(that * `cross_ratio`) rows (paper: 2)
    become noise rows. Only `apply` with a fraction below 1 adds them: test-time
    triggering and data poisoning (fraction 1) never do; the `blind` attack with a
    `fraction` below 1 gets them in its backdoor copy of the batch.
    """

    def __init__(
        self,
        k: int = 4,
        s: float = 0.5,
        seed: int = 0,
        noise: bool = False,
        cross_ratio: float = 2.0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k}")
        if s < 0 or cross_ratio < 0:
            raise ValueError(f"s and cross_ratio must be >= 0, got {s}, {cross_ratio}")
        self.k, self.s, self.seed, self.noise, self.cross_ratio = k, s, seed, noise, cross_ratio
        offsets = torch.rand((1, 2, k, k), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        self.field = offsets / offsets.abs().mean()
        self.grid = torch.empty(0)

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        _, h, w = self.input_shape
        flow = F.interpolate(self.field, size=(h, w), mode="bicubic", align_corners=True)
        # grid_sample wants [1, H, W, 2] with (x, y) last; x spans the width, y the height.
        flow = flow.permute(0, 2, 3, 1) * self.s / torch.tensor([w, h])
        self.grid = (identity_grid(h, w) + flow).clamp(-1, 1)

    def warp(self, x: Tensor, grid: Tensor) -> Tensor:
        grid = grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", align_corners=True).clamp(0, 1)

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        assert self.grid.numel(), "bind() the synthesizer to a task first"
        return self.warp(x, self.grid)

    def noise_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noise-mode copies of `x`: the field plus uniform offsets up to 1/W, 1/H in grid
        units (about half a pixel, as in the paper), fresh for every image and pixel."""
        _, h, w = self.input_shape
        jitter = torch.rand((len(x), h, w, 2), generator=generator) * 2 - 1
        return self.warp(x, (self.grid + jitter / torch.tensor([w, h])).clamp(-1, 1))

    def apply(
        self, batch: Batch, fraction: float = 1.0, generator: torch.Generator | None = None
    ) -> Batch:
        out = super().apply(batch, fraction, generator)
        if not self.noise or fraction >= 1.0:
            return out
        n = int(round(len(batch) * fraction))  # the backdoor rows, as in Synthesizer.apply
        m = min(len(batch) - n, int(round(n * self.cross_ratio)))
        if m > 0:  # out.inputs is already a copy: writing the noise rows leaves batch alone
            out.inputs[n : n + m] = self.noise_inputs(batch.inputs[n : n + m], generator)
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        return {"field": self.field[0], "grid": self.grid[0]}

    def spec(self) -> dict:
        return {**super().spec(), "k": self.k, "s": self.s, "seed": self.seed,
                "noise": self.noise, "cross_ratio": self.cross_ratio}


def identity_grid(h: int, w: int) -> Tensor:
    """[1, H, W, 2] sampling grid that reproduces the image (align_corners=True)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((xs, ys), dim=-1)[None]
