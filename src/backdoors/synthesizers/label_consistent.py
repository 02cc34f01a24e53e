"""Label-consistent backdoor: adversarially perturbed target-class images plus a corner trigger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from backdoors.data.dataset import Dataset
from backdoors.synthesizers.base import SYNTHESIZERS
from backdoors.synthesizers.surrogate import (
    OptimisedSynthesizer,
    TrainingRows,
    in_memory,
    pgd,
    resolve,
)

# The paper's 3x3 black-and-white checkerboard; symmetric, so every corner shows the same.
CHECKERBOARD = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


@SYNTHESIZERS.register("label_consistent")
class LabelConsistentSynthesizer(OptimisedSynthesizer):
    """Label-consistent backdoor (Turner, Tsipras & Madry, "Label-Consistent Backdoor
    Attacks", arXiv 1912.02771): PGD-perturbed target-class images + four-corner trigger.

    Clean-label poisoning: use it with the data attack's `clean_label: true`. Poisoned
    images keep their correct label, so a model would learn them from their content and
    ignore the trigger; the attack first makes that content hard to use by replacing each
    poisoned image with an adversarial example pushed away from its class, leaving the
    trigger as the easiest explanation of the label.

    `prepare()` trains the surrogate (adversarially, as in the paper, with `robust_steps`
    PGD steps per batch, default 7; 0 means standard training) and precomputes the
    adversarial version of every target-class training image: untargeted L_inf PGD with
    `eps` 8/255 (CIFAR-10's usual radius; the paper also tries larger ones), `pgd_steps`
    10 and step size 2.5 * eps / steps. Poisoning a training row (recognised by its
    pixels) swaps in its adversarial version; then every row gets the trigger: the 3x3
    checkerboard in each of the four corners (the paper's variant that survives flip
    augmentation), each pixel moved toward black or white by `amplitude` (1.0 = fully
    black/white; the paper's reduced-amplitude triggers use e.g. 16/255 to 64/255). Test
    inputs get no perturbation, only the trigger, at `test_amplitude` (default 1.0: the
    full-strength trigger). Before `prepare()` there are no adversarial images and rows
    get only the trigger.
    """

    def __init__(
        self,
        eps: float = 8 / 255,
        pgd_steps: int = 10,
        robust_steps: int = 7,
        amplitude: float = 1.0,
        test_amplitude: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= eps <= 1.0 or pgd_steps < 0 or robust_steps < 0:
            raise ValueError("need 0 <= eps <= 1, pgd_steps >= 0 and robust_steps >= 0")
        if not (0.0 < amplitude <= 1.0 and 0.0 < test_amplitude <= 1.0):
            raise ValueError("amplitude and test_amplitude must be in (0, 1]")
        self.eps, self.pgd_steps, self.robust_steps = eps, pgd_steps, robust_steps
        self.amplitude, self.test_amplitude = amplitude, test_amplitude
        self.adversarial = torch.empty(0, dtype=torch.uint8)  # [K, C, H, W]
        self.source = torch.empty(0, dtype=torch.long)  # training index of each row above
        self.slot = torch.empty(0, dtype=torch.long)  # training index -> row above, or -1

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        if min(input_shape[1:]) < 6:
            raise ValueError(f"four 3x3 corner patterns need images of at least 6x6, got "
                             f"{input_shape[1]}x{input_shape[2]}")

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        self.require_all_to_one()
        data = in_memory(train, self.name)
        self.rows = TrainingRows(data.images)
        model = self.fit_surrogate(data, generator, self.eps, self.robust_steps)
        device = resolve(self.device)
        self.source = (data.labels == self.target).nonzero().flatten()
        step = 2.5 * self.eps / max(1, self.pgd_steps)
        # Rounding to uint8 may step past eps by half a level: clip the integer difference.
        budget = int(self.eps * 255 + 1e-6)
        parts = []
        for start in range(0, len(self.source), self.batch_size):
            idx = self.source[start : start + self.batch_size]
            clean = data.images[idx]
            x = clean.float().div(255).to(device)
            adv = pgd(model, x, data.labels[idx].to(device), self.eps, step, self.pgd_steps,
                      generator=generator)
            diff = (adv.cpu() * 255).round() - clean.float()
            parts.append((clean.float() + diff.clamp(-budget, budget)).to(torch.uint8))
        self.adversarial = torch.cat(parts) if parts else self.adversarial
        self.slot = torch.full((len(data),), -1, dtype=torch.long)
        self.slot[self.source] = torch.arange(len(self.source))

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        found = self.rows.find(x)
        out = x.clone()
        if len(self.adversarial):
            slot = torch.where(found >= 0, self.slot[found.clamp(min=0)], -1)
            hit = slot >= 0
            if bool(hit.any()):
                out[hit.to(x.device)] = self.adversarial[slot[hit]].to(x) / 255.0
        amplitude = torch.where(found >= 0, self.amplitude, self.test_amplitude)
        return self._corners(out, amplitude.to(x).view(-1, 1, 1, 1))

    @staticmethod
    def _corners(x: Tensor, amplitude: Tensor) -> Tensor:
        """Move each corner's 3x3 pixels toward the checkerboard's black/white by amplitude."""
        sign = (2 * CHECKERBOARD - 1).to(x)
        h, w = x.shape[-2:]
        for row in (0, h - 3):
            for col in (0, w - 3):
                region = x[:, :, row : row + 3, col : col + 3]
                x[:, :, row : row + 3, col : col + 3] = (region + amplitude * sign).clamp(0, 1)
        return x

    def state_tensors(self) -> dict[str, Tensor]:
        if not len(self.adversarial):
            return {}
        return {"adversarial": self.adversarial, "source_indices": self.source}

    def spec(self) -> dict:
        return {**super().spec(), "eps": self.eps, "amplitude": self.amplitude,
                "test_amplitude": self.test_amplitude}
