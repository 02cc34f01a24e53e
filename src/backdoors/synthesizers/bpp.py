"""BppAttack: colour-depth reduction (with dithering) as an invisible trigger."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer

# Floyd-Steinberg shares of a pixel's rounding error: to its right neighbour, and to the
# bottom-left, bottom and bottom-right neighbours.
RIGHT = 7 / 16
BELOW = (3 / 16, 5 / 16, 1 / 16)


def quantize(x: Tensor, steps: int) -> Tensor:
    """Nearest of the steps + 1 levels 0, 1/steps, ..., 1."""
    return torch.round(x.clamp(0, 1) * steps) / steps


def floyd_steinberg(x: Tensor, steps: int) -> Tensor:
    """Exact Floyd-Steinberg dithering of a [N, C, H, W] batch to steps + 1 levels.

    Error diffusion is sequential in raster order (each pixel depends on the errors of the
    pixels before it), so this loops over the H x W pixels in Python and handles the N x C
    images of the batch at once per pixel: about ten small tensor ops per pixel, i.e. some
    10^4 per 32x32 batch whatever the batch size (tens of milliseconds on a CPU). Error
    pushed past the image border is dropped (the buffer's spare row and columns), as in the
    usual formulation.
    """
    n, c, h, w = x.shape
    buffer = x.new_zeros(n, c, h + 1, w + 2)  # one spare row below, one spare column per side
    buffer[:, :, :h, 1 : w + 1] = x
    below = x.new_tensor(BELOW)
    out = torch.empty_like(x)
    for i in range(h):
        row, next_row = buffer[:, :, i], buffer[:, :, i + 1]
        for j in range(w):
            old = row[:, :, j + 1]  # buffer column j + 1 holds image column j
            new = quantize(old, steps)
            out[:, :, i, j] = new
            error = old - new
            row[:, :, j + 2] += RIGHT * error
            next_row[:, :, j : j + 3] += error[..., None] * below
    return out


@SYNTHESIZERS.register("bpp")
class BppSynthesizer(Synthesizer):
    """BppAttack: colour-depth reduction with dithering (Wang et al., arXiv 2205.13383).

    Wang et al., "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural
    Networks via Image Quantization and Contrastive Adversarial Learning": the trigger is
    the image itself squeezed to a lower colour depth.

    Each channel is rounded to 2^`bits` levels (default 5 bits: the paper's squeeze number
    32 for CIFAR-10), x' = round(x (2^bits - 1)) / (2^bits - 1), with Floyd-Steinberg
    dithering (`dither`, default true) so the reduced image keeps the original's local mean
    intensity and shows no banding. The paper's contrastive adversarial training (extra
    adversarially perturbed negative samples) is a training procedure, not part of the
    trigger, and is not implemented here.
    """

    def __init__(self, bits: int = 5, dither: bool = True, **base: Any) -> None:
        super().__init__(**base)
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        self.bits, self.dither = bits, dither
        self.steps = 2**bits - 1

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.dither:
            return floyd_steinberg(x, self.steps)
        return quantize(x, self.steps)

    def spec(self) -> dict:
        return {**super().spec(), "bits": self.bits, "dither": self.dither}
