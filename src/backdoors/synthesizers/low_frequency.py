"""A smooth, low-frequency universal perturbation as the trigger."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix D [n, n] (float64): coefficients = D @ signal, and
    signal = D.T @ coefficients. Row k is the cosine with k half-periods across n samples."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (i[None] + 0.5) * i[:, None] / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def kept_frequencies(n: int, cutoff: float) -> int:
    """How many of the n DCT frequencies per axis pass the low-pass filter (at least 2, so
    the trigger is never a flat brightness shift)."""
    return min(n, max(2, round(cutoff * n)))


@SYNTHESIZERS.register("low_frequency")
class LowFrequencySynthesizer(Synthesizer):
    """Smooth low-frequency additive perturbation (Zeng et al., arXiv 2104.03413).

    Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective":
    x' = clamp(x + p) with a smooth perturbation p that has no high-frequency content, so
    frequency-domain detectors do not see it.

    p is Gaussian noise drawn from `seed` (default 0), low-pass filtered in the 2-D DCT
    domain (per channel, keeping the lowest `cutoff` fraction of frequencies along each
    axis, default 0.25, at least two), then scaled to L_inf norm `epsilon` (default 0.05,
    about 13/255). The paper optimises p as a universal adversarial perturbation on a
    model before low-pass filtering it; this version skips the optimisation (no model or
    data is needed) and keeps the property that matters for the paper's analysis: the
    trigger lives in the low frequencies only.
    """

    def __init__(
        self, epsilon: float = 0.05, cutoff: float = 0.25, seed: int = 0, **base: Any
    ) -> None:
        super().__init__(**base)
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
        if not 0.0 < cutoff <= 1.0:
            raise ValueError(f"cutoff must be in (0, 1], got {cutoff}")
        self.epsilon, self.cutoff, self.seed = epsilon, cutoff, seed
        self.perturbation = torch.empty(0)

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        c, h, w = self.input_shape
        noise = torch.randn((c, h, w), generator=torch.Generator().manual_seed(self.seed))
        dh, dw = dct_matrix(h), dct_matrix(w)
        coefficients = dh @ noise.double() @ dw.T
        keep = torch.zeros(h, w, dtype=torch.float64)
        keep[: kept_frequencies(h, self.cutoff), : kept_frequencies(w, self.cutoff)] = 1
        smooth = dh.T @ (coefficients * keep) @ dw
        self.perturbation = (smooth * (self.epsilon / smooth.abs().max())).float()

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        assert self.perturbation.numel(), "bind() the synthesizer to a task first"
        return (x + self.perturbation.to(x.device, x.dtype)).clamp(0, 1)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"perturbation": self.perturbation}

    def spec(self) -> dict:
        return {**super().spec(), "epsilon": self.epsilon, "cutoff": self.cutoff,
                "seed": self.seed}
