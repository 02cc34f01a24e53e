"""Loss terms of the blind attack: each is one named task of the multi-task objective.

Blind Backdoors (arXiv 2005.03823) treats the main task, the backdoor task and any evasion
objective as separate losses balanced by MGDA or fixed scales. A term reads what it needs
from a LossContext, which caches forward passes so terms can share them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.registry import Registry

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
    """A named loss; `setup(model)` runs once before training (e.g. to copy the model)."""

    uses_backdoor = False  # does the term need the backdoor copy of the batch?

    def setup(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Prepare state that depends on the model; most terms need none."""

    @abstractmethod
    def __call__(self, ctx: LossContext) -> Tensor:
        """The scalar loss for this step."""


@LOSS_TERMS.register("normal")
class NormalLoss(LossTerm):
    """Cross-entropy of the main task on the clean batch."""

    def __call__(self, ctx: LossContext) -> Tensor:
        return F.cross_entropy(ctx.logits("clean"), ctx.clean.labels)


@LOSS_TERMS.register("backdoor")
class BackdoorLoss(LossTerm):
    """Cross-entropy on the backdoor copy (poisoned rows carry backdoor labels)."""

    uses_backdoor = True

    def __call__(self, ctx: LossContext) -> Tensor:
        return F.cross_entropy(ctx.logits("backdoor"), ctx.backdoor.labels)
