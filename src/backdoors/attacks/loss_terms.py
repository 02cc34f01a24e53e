"""Loss terms of the blind attack: each is one named task of the multi-task objective.

Blind Backdoors (arXiv 2005.03823) treats the main task, the backdoor task and any evasion
objective as separate losses balanced by MGDA or fixed scales. A term reads what it needs
from a LossContext, which caches forward passes so terms can share them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.registry import Registry
from backdoors.synthesizers.base import Synthesizer

if TYPE_CHECKING:
    from backdoors.attacks.balancers import Balancer

LOSS_TERMS: Registry[LossTerm] = Registry("loss term")


@dataclass
class LossContext:
    """One training step's model, clean batch and backdoor copy, with cached logits."""

    model: nn.Module  # under DP-SGD: the model as a pure function of its inputs
    clean: Batch
    backdoor: Batch
    _logits: dict[str, Tensor] = field(default_factory=dict)
    # Weights given this step to terms the model's balancer leaves out (trains_model False).
    scales: dict[str, float] = field(default_factory=dict)

    def logits(self, which: str) -> Tensor:
        """Model outputs on the `clean` or `backdoor` batch, computed once per step."""
        if which not in self._logits:
            self._logits[which] = self.model(getattr(self, which).inputs)
        return self._logits[which]


class LossTerm(ABC):
    """A named loss; `setup(model, synthesizer)` runs once before training (e.g. to copy the
    model or learn the target class)."""

    uses_backdoor = False  # does the term need the backdoor copy of the batch?
    # False for a term that steers the attack's own variables, not the model (mask_norm:
    # the reversed Neural Cleanse mask): the attack reports its value and the weight it
    # put in ctx.scales, and leaves it out of the model's balancer.
    trains_model = True

    def bind(self, terms: dict[str, LossTerm], balancer: Balancer) -> None:  # noqa: B027
        """See the attack's other terms and its balancer, once, when the attack is built
        (raise ConfigError when a term it needs is missing); most terms need neither."""

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


class RowLossTerm(LossTerm):
    """A loss that is a weighted mean of per-row losses: sum_i w_i l_i / sum_i w_i.

    Row i of the clean batch and row i of its backdoor copy are one privacy unit, so
    DP-SGD (backdoors.training.dp) can differentiate each unit separately: it calls
    `row_losses` on one-row contexts and multiplies by `row_factors`, computed once on the
    whole batch. Terms that are not row-wise (evasion terms) are refused under DP.
    """

    @abstractmethod
    def row_losses(self, ctx: LossContext) -> Tensor:
        """Each row's loss [N]; may only read `ctx.logits` and the batches' rows."""

    def row_weights(self, ctx: LossContext) -> Tensor | None:
        """Per-row weights [N] from the batches alone (no model), or None for equal ones."""
        return None

    def __call__(self, ctx: LossContext) -> Tensor:
        return (self.row_losses(ctx) * row_factors(self, ctx)).mean()


def row_factors(term: RowLossTerm, ctx: LossContext) -> Tensor:
    """f_i = w_i * N / sum(w), so mean_i(f_i * l_i) is the term's weighted mean loss."""
    weights = term.row_weights(ctx)
    if weights is None:
        return torch.ones(len(ctx.clean), device=ctx.clean.device)
    return weights * (len(weights) / weights.sum().clamp_min(1e-12))


@LOSS_TERMS.register("normal")
class NormalLoss(RowLossTerm):
    """Cross-entropy of the main task on the clean batch."""

    def row_losses(self, ctx: LossContext) -> Tensor:
        return F.cross_entropy(ctx.logits("clean"), ctx.clean.labels, reduction="none")


@LOSS_TERMS.register("backdoor")
class BackdoorLoss(RowLossTerm):
    """Cross-entropy on the backdoor copy (poisoned rows carry backdoor labels).

    When the synthesizer's `loss_weights(batch)` returns per-row weights, the loss is their
    weighted mean instead; the `complex` trigger uses it to down-weight rows with no
    target identity. Other synthesizers return None (plain mean).
    """

    uses_backdoor = True
    synthesizer: Synthesizer | None = None

    def setup(self, model: nn.Module, synthesizer: Synthesizer) -> None:
        self.synthesizer = synthesizer

    def row_losses(self, ctx: LossContext) -> Tensor:
        return F.cross_entropy(ctx.logits("backdoor"), ctx.backdoor.labels, reduction="none")

    def row_weights(self, ctx: LossContext) -> Tensor | None:
        return None if self.synthesizer is None else self.synthesizer.loss_weights(ctx.backdoor)
