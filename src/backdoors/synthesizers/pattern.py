"""Pixel-pattern triggers: the Backdoors 101 pattern and a single pixel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from backdoors.synthesizers.base import SYNTHESIZERS, LabelMode, Synthesizer

# Backdoors 101 pattern, row by row: 1 = white, 0 = black, -1 = transparent.
ORIGINAL_PATTERN = (
    (1, 0, 1),
    (-1, 1, -1),
    (-1, -1, 0),
    (-1, 1, -1),
    (1, 0, 1),
)
ORIGINAL_POSITION = (3, 23)


def default_position(shape: tuple[int, int], image: Sequence[int]) -> tuple[int, int]:
    """The original (3, 23) top-left corner, moved inside images too small for it."""
    _, h, w = image
    return min(ORIGINAL_POSITION[0], h - shape[0]), min(ORIGINAL_POSITION[1], w - shape[1])


@SYNTHESIZERS.register("pattern")
class PatternSynthesizer(Synthesizer):
    """Backdoors 101 / BadNets pixel pattern (arXiv 2005.03823, 1708.06733).

    A 5x3 grid of white, black and transparent cells pasted over all channels with its
    top-left corner at `position` (default (3, 23); moved inside smaller images).
    `dynamic: true` redraws, per batch, a random size (`min_size`..`max_size` px tall,
    nearest-neighbour scaled), a random horizontal/vertical flip and a random position;
    transparent cells stay transparent (the original lost the mask when resizing).
    """

    def __init__(
        self,
        target: int = 8,
        label_mode: LabelMode = "all_to_one",
        position: list[int] | None = None,
        dynamic: bool = False,
        min_size: int = 5,
        max_size: int = 10,
        pattern: list[list[int]] | None = None,
    ) -> None:
        super().__init__(target, label_mode)
        grid = pattern if pattern is not None else ORIGINAL_PATTERN
        cells = torch.tensor(grid, dtype=torch.float)
        if cells.dim() != 2 or not bool(((cells == -1) | (cells == 0) | (cells == 1)).all()):
            raise ValueError("pattern must be a 2-D grid of 1 (white), 0 (black), -1 (clear)")
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.values = cells.clamp(min=0)
        self.mask = (cells >= 0).float()
        self.position = None if position is None else (int(position[0]), int(position[1]))
        self.dynamic, self.min_size, self.max_size = dynamic, min_size, max_size

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        h, w = input_shape[1:]
        ph, pw = self.values.shape
        row, col = self.position or default_position((ph, pw), input_shape)
        if row < 0 or col < 0 or row + ph > h or col + pw > w:
            raise ValueError(f"a {ph}x{pw} pattern at {(row, col)} does not fit {h}x{w} images; "
                             "set synthesizer.position")
        widest = max(1, round(self.max_size * pw / ph))
        if self.dynamic and (self.max_size > h or widest > w):
            raise ValueError(f"a dynamic pattern up to {self.max_size}x{widest} does not fit "
                             f"{h}x{w} images; lower synthesizer.max_size")
        self.position = (row, col)

    def _stamp(self, generator: torch.Generator | None) -> tuple[Tensor, Tensor, int, int]:
        """The (values, mask, row, col) to paste for this batch."""
        values, mask = self.values, self.mask
        if not self.dynamic:
            assert self.position is not None, "bind() the synthesizer to a task first"
            return values, mask, *self.position
        _, h, w = self.input_shape
        size = int(torch.randint(self.min_size, self.max_size + 1, (1,), generator=generator))
        width = max(1, round(size * values.shape[1] / values.shape[0]))
        rows = (torch.arange(size) * values.shape[0] // size)
        cols = (torch.arange(width) * values.shape[1] // width)
        values, mask = values[rows][:, cols], mask[rows][:, cols]
        flips = torch.rand(2, generator=generator) < 0.5
        dims = [d for d, f in zip((0, 1), flips.tolist(), strict=True) if f]
        if dims:
            values, mask = values.flip(dims), mask.flip(dims)
        row = int(torch.randint(0, h - size + 1, (1,), generator=generator))
        col = int(torch.randint(0, w - width + 1, (1,), generator=generator))
        return values, mask, row, col

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        values, mask, row, col = self._stamp(generator)
        ph, pw = values.shape
        out = x.clone()
        region = out[:, :, row : row + ph, col : col + pw]
        values, mask = values.to(x.device, x.dtype), mask.to(x.device, x.dtype)
        out[:, :, row : row + ph, col : col + pw] = region * (1 - mask) + values * mask
        return out

    def spec(self) -> dict:
        return {**super().spec(), "position": list(self.position or ()), "dynamic": self.dynamic}


@SYNTHESIZERS.register("single_pixel")
class SinglePixelSynthesizer(PatternSynthesizer):
    """One white pixel at (3, 23), Blind Backdoors' smallest trigger (arXiv 2005.03823)."""

    def __init__(
        self,
        target: int = 8,
        label_mode: LabelMode = "all_to_one",
        position: list[int] | None = None,
        dynamic: bool = False,
    ) -> None:
        super().__init__(target, label_mode, position, dynamic, 1, 1, [[1]])
