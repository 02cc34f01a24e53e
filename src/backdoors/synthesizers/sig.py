"""SIG: an additive horizontal sinusoid, the classic clean-label trigger."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer


@SYNTHESIZERS.register("sig")
class SigSynthesizer(Synthesizer):
    """SIG: a horizontal sinusoid added to the image (Barni et al., arXiv 1902.11237).

    Barni et al., "A new Backdoor Attack in CNNs by training set corruption without label
    poisoning": x'[i, j] = clamp(x[i, j] + delta sin(2 pi j f / W)).

    The same signal is added to every row and channel; it varies over columns j only.
    Defaults follow the paper's sinusoidal signal: `delta` 20/255 (amplitude in pixel
    space), `frequency` 6 (periods across the image width). The paper's attack is
    clean-label: use it with `attack: {name: data, clean_label: true}`, which triggers
    target-class training images and keeps their labels. One amplitude serves training and
    testing.
    """

    def __init__(self, delta: float = 20 / 255, frequency: float = 6.0, **base: Any) -> None:
        super().__init__(**base)
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {delta}")
        if frequency <= 0:
            raise ValueError(f"frequency must be > 0, got {frequency}")
        self.delta, self.frequency = delta, frequency
        self.signal = torch.empty(0)

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        width = self.input_shape[2]
        columns = torch.arange(width, dtype=torch.float64)
        # Computed in float64 so that the signal is the formula to float32 precision.
        self.signal = (self.delta * torch.sin(2 * math.pi * columns * self.frequency / width)
                       ).float()

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        assert self.signal.numel(), "bind() the synthesizer to a task first"
        return (x + self.signal.to(x.device, x.dtype)).clamp(0, 1)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"signal": self.signal}

    def spec(self) -> dict:
        return {**super().spec(), "delta": self.delta, "frequency": self.frequency}
