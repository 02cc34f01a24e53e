"""STRIP: triggered inputs keep their (target) prediction whatever is superimposed on them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, InputDetector


def prediction_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) per row."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def superimpose(x: Tensor, overlay: Tensor) -> Tensor:
    """STRIP's superimposition: the two images added pixel by pixel, saturating at white."""
    return (x + overlay).clamp(0.0, 1.0)


@DEFENSES.register("strip")
class Strip(InputDetector):
    """STRIP (arXiv 1902.06531): low prediction entropy under superimposed clean images.

    Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on
    Deep Neural Networks".

    Each input is superimposed with `n` (default 32; the paper uses 100) clean-budget
    images drawn at random, as clip(x + clean, 0, 1); a trigger dominates the blend, so a
    trojaned input keeps its prediction and the mean prediction entropy over the `n`
    copies stays low. Score = minus the mean entropy (higher = more suspicious). The
    paper thresholds the entropy at a chosen false-rejection rate on clean inputs; here
    the runner measures AUROC and TPR at 5% FPR over the raw scores instead.
    Deterministic: overlays are drawn from the defense generator.
    """

    def __init__(self, n: int = 32, **base: Any) -> None:
        super().__init__(**base)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self._clean: Tensor | None = None
        self._generator: torch.Generator | None = None

    def fit(self, model: nn.Module, data: DefenseData) -> None:
        self._clean = data.clean.images
        self._generator = data.generator

    @torch.no_grad()
    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        if self._clean is None or self._generator is None:
            raise RuntimeError("call fit(model, data) before score(model, x)")
        was_training = model.training
        model.eval()
        entropy = torch.zeros(len(x), device=x.device)
        # One forward pass per overlay round (each input gets its own random overlay), so
        # memory stays at one batch whatever n is.
        for _ in range(self.n):
            idx = torch.randint(len(self._clean), (len(x),), generator=self._generator)
            overlay = self._clean[idx.to(self._clean.device)].to(x.device).float() / 255.0
            entropy += prediction_entropy(model(superimpose(x, overlay)))
        model.train(was_training)
        return -entropy / self.n
