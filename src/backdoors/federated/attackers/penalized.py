"""An injection method with an extra loss term mixed in: alpha * L_attack + (1 - alpha) * L."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from backdoors.attacks.base import Attack, StepReport
from backdoors.attacks.loss_terms import LossContext, LossTerm
from backdoors.batch import Batch
from backdoors.data.dataset import Dataset


class Penalized(Attack):
    """Wraps any injection method (data, batch, blind, ...): its step's gradient is
    weighted by `alpha` and the gradient of (1 - alpha) * `term` (a loss term of the
    blind attack's kind, set up when training starts) is added. Poisoning and state are
    the wrapped method's. Constrain-and-scale's objective
    L = alpha * L_class + (1 - alpha) * L_ano (arXiv 1807.00459) for every injection."""

    def __init__(self, inner: Attack, term: LossTerm, alpha: float, label: str) -> None:
        self.inner, self.term, self.alpha, self.label = inner, term, alpha, label
        self.synthesizer = inner.synthesizer

    @property
    def name(self) -> str:
        return self.inner.name

    def start(self, model: nn.Module) -> None:
        self.inner.start(model)
        self.term.setup(model, self.synthesizer)

    def poison_training_set(self, dataset: Dataset, generator: torch.Generator
                            ) -> tuple[Dataset, Tensor]:
        return self.inner.poison_training_set(dataset, generator)

    def backward(self, model: nn.Module, batch: Batch, generator: torch.Generator
                 ) -> StepReport:
        report = self.inner.backward(model, batch, generator)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(self.alpha)
        loss = self.term(LossContext(model, batch, batch))
        ((1 - self.alpha) * loss).backward()
        scales = {k: v * self.alpha for k, v in report.scales.items()}
        return StepReport({**report.losses, self.label: float(loss.detach())},
                          {**scales, self.label: 1 - self.alpha})

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
