"""Loss terms of the blind attack: each is one named task of the multi-task objective.

Blind Backdoors (arXiv 2005.03823) treats the main task, the backdoor task and any evasion
objective as separate losses balanced by MGDA or fixed scales. A term reads what it needs
from a LossContext, which caches forward passes so terms can share them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.registry import Registry
from backdoors.synthesizers.base import Synthesizer

LOSS_TERMS: Registry[LossTerm] = Registry("loss term")


@dataclass
class LossContext:
    """One training step's model, clean batch and backdoor copy, with cached logits."""

    model: nn.Module
    clean: Batch
    backdoor: Batch
    _logits: dict[str, Tensor] = field(default_factory=dict)

    def logits(self, which: str) -> Tensor:
        """Model outputs on the `clean` or `backdoor` batch, computed once per step."""
        if which not in self._logits:
            self._logits[which] = self.model(getattr(self, which).inputs)
        return self._logits[which]


class LossTerm(ABC):
    """A named loss; `setup(model, synthesizer)` runs once before training (e.g. to copy the
    model or learn the target class)."""

    uses_backdoor = False  # does the term need the backdoor copy of the batch?

    def setup(self, model: nn.Module, synthesizer: Synthesizer) -> None:  # noqa: B027
        """Prepare state that depends on the model; most terms need none."""

    @abstractmethod
    def __call__(self, ctx: LossContext) -> Tensor:
        """The scalar loss for this step."""

    def state_dict(self) -> dict[str, Any]:
        """Running state (tensors, numbers) to checkpoint for exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore what `state_dict` returned."""


@LOSS_TERMS.register("normal")
class NormalLoss(LossTerm):
    """Cross-entropy of the main task on the clean batch."""

    def __call__(self, ctx: LossContext) -> Tensor:
        return F.cross_entropy(ctx.logits("clean"), ctx.clean.labels)


@LOSS_TERMS.register("backdoor")
class BackdoorLoss(LossTerm):
    """Cross-entropy on the backdoor copy (poisoned rows carry backdoor labels).

    When the synthesizer has a `loss_weights(batch)` method returning per-row weights, the
    loss is their weighted mean instead; the `complex` trigger uses it to down-weight rows
    with no target identity. Other synthesizers have none (plain mean).
    """

    uses_backdoor = True
    synthesizer: Synthesizer | None = None

    def setup(self, model: nn.Module, synthesizer: Synthesizer) -> None:
        self.synthesizer = synthesizer

    def __call__(self, ctx: LossContext) -> Tensor:
        logits, labels = ctx.logits("backdoor"), ctx.backdoor.labels
        weigh = getattr(self.synthesizer, "loss_weights", None)
        weights = weigh(ctx.backdoor) if weigh is not None else None
        if weights is None:
            return F.cross_entropy(logits, labels)
        per_row = F.cross_entropy(logits, labels, reduction="none")
        return (per_row * weights).sum() / weights.sum().clamp_min(1e-12)
