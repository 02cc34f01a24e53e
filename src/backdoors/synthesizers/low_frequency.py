"""A smooth, low-frequency universal perturbation as the trigger."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.data.dataset import Dataset
from backdoors.synthesizers.base import SYNTHESIZERS
from backdoors.synthesizers.surrogate import OptimisedSynthesizer, in_memory, resolve


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
class LowFrequencySynthesizer(OptimisedSynthesizer):
    """Smooth low-frequency additive trigger (Zeng et al., arXiv 2104.03413).

    Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective":
    x' = clamp(x + p) with a smooth perturbation p that has no high-frequency content, so
    frequency-domain detectors do not see it. As in the paper, p is a universal
    adversarial perturbation toward the target class restricted to the low frequencies.

    p lives in the 2-D DCT domain: per channel only the lowest `cutoff` fraction of
    frequencies along each axis (default 0.25, at least two) may be non-zero, and
    |p|_inf <= `epsilon` (default 0.05, about 13/255). It starts as Gaussian noise drawn
    from `seed` (default 0), low-pass filtered and scaled to norm `epsilon`; that is the
    trigger before `prepare()` or with `trigger_steps` 0 (no model or data needed).
    `prepare()` trains a surrogate on the training set (the shared `surrogate_*` options),
    then runs `trigger_steps` (200) Adam steps (`trigger_lr` 0.05, relative to the largest
    starting coefficient) on the kept DCT coefficients, lowering the surrogate's
    cross-entropy toward the target on random batches of non-target training images.
    After every step p is scaled back onto the epsilon ball, which keeps it low-frequency
    (scaling does not add frequencies). The paper instead low-pass filters an
    unconstrained perturbation once at the end.
    """

    def __init__(
        self, epsilon: float = 0.05, cutoff: float = 0.25, seed: int = 0,
        trigger_steps: int = 200, trigger_lr: float = 0.05, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
        if not 0.0 < cutoff <= 1.0:
            raise ValueError(f"cutoff must be in (0, 1], got {cutoff}")
        if trigger_steps < 0 or trigger_lr <= 0:
            raise ValueError("need trigger_steps >= 0 and trigger_lr > 0")
        self.epsilon, self.cutoff, self.seed = epsilon, cutoff, seed
        self.trigger_steps, self.trigger_lr = trigger_steps, trigger_lr
        self.perturbation = torch.empty(0)
        # The kept DCT rows per axis (float64 [k_h, h] and [k_w, w]), set by bind():
        # p = bh.T @ C @ bw for coefficients C [c, k_h, k_w].
        self.bh, self.bw = torch.empty(0), torch.empty(0)

    def _to_pixels(self, coefficients: Tensor) -> Tensor:
        return self.bh.to(coefficients).T @ coefficients @ self.bw.to(coefficients)

    def _to_coefficients(self, pixels: Tensor) -> Tensor:
        return self.bh.to(pixels) @ pixels @ self.bw.to(pixels).T

    def _onto_ball(self, coefficients: Tensor) -> Tensor:
        peak = self._to_pixels(coefficients).abs().max()
        return coefficients * (self.epsilon / peak.clamp(min=1e-12)).clamp(max=1.0)

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        _, h, w = self.input_shape
        self.bh = dct_matrix(h)[: kept_frequencies(h, self.cutoff)]
        self.bw = dct_matrix(w)[: kept_frequencies(w, self.cutoff)]
        noise = torch.randn(tuple(self.input_shape),
                            generator=torch.Generator().manual_seed(self.seed)).double()
        smooth = self._to_pixels(self._to_coefficients(noise))
        self.perturbation = (smooth * (self.epsilon / smooth.abs().max())).float()

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        if self.trigger_steps == 0:
            return
        data = in_memory(train, self.name)
        model = self.fit_surrogate(data, generator)
        device = resolve(self.device)
        pool = (data.labels != self.target).nonzero().flatten()
        self.bh, self.bw = self.bh.float().to(device), self.bw.float().to(device)
        coefficients = self._to_coefficients(self.perturbation.to(device)).requires_grad_(True)
        # Adam's steps are about lr in coefficient units; tie them to the trigger's size.
        scale = float(coefficients.detach().abs().max())
        opt = torch.optim.Adam([coefficients], lr=self.trigger_lr * scale)
        target = torch.full((min(self.batch_size, len(pool)),), self.target, device=device)
        for _ in range(self.trigger_steps):
            pick = pool[torch.randint(0, len(pool), (len(target),), generator=generator)]
            x = data.images[pick].float().div(255).to(device)
            p = self._to_pixels(coefficients)
            loss = F.cross_entropy(model((x + p).clamp(0, 1)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                coefficients.copy_(self._onto_ball(coefficients))
        self.perturbation = self._to_pixels(coefficients.detach()).cpu()

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        assert self.perturbation.numel(), "bind() the synthesizer to a task first"
        return (x + self.perturbation.to(x.device, x.dtype)).clamp(0, 1)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"perturbation": self.perturbation}

    def spec(self) -> dict:
        return {**super().spec(), "epsilon": self.epsilon, "cutoff": self.cutoff,
                "seed": self.seed, "trigger_steps": self.trigger_steps}
