"""PGD: local training projected onto a norm ball around the global model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backdoors.errors import ConfigError
from backdoors.federated.attackers.base import ATTACKERS, Attacker, AttackerSetup
from backdoors.federated.attackers.constraints import project_l2_, project_model
from backdoors.federated.updates import FlatModel


@ATTACKERS.register("pgd")
class PGD(Attacker):
    """Projected gradient descent ("Attack of the Tails: Yes, You Really Can Backdoor
    Federated Learning", Wang et al., NeurIPS 2020, arXiv 2007.05084): every
    `project_every` optimizer steps the local model is projected onto the L2 ball of
    radius `eps` around the global model, so the update passes norm-bound defenses.
    Defaults from the authors' published command (`--eps 2 --project_frequency 10`);
    the update is projected once more after training, so what is sent always has norm
    <= eps.

    `replacement: true` is their PGD with model replacement: the update is scaled by
    `federated.weight_scale` and the *scaled* update projected onto eps. During training
    the ball then has radius eps / weight_scale, so the scaled update already lies in
    the eps ball and the last projection only absorbs rounding. Without replacement the
    update is not scaled and weight_scale must stay 1.
    """

    def __init__(self, eps: float = 2.0, project_every: int = 10,
                 replacement: bool = False) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if project_every < 1:
            raise ValueError(f"project_every must be >= 1, got {project_every}")
        self.eps, self.project_every, self.replacement = eps, project_every, replacement
        self.steps = 0
        self.scratch = torch.empty(0)

    def bind(self, setup: AttackerSetup) -> None:
        super().bind(setup)
        if not self.replacement and setup.fc.weight_scale != 1:
            raise ConfigError("federated.attacker (pgd): federated.weight_scale "
                              f"{setup.fc.weight_scale} scales the update only with "
                              "replacement: true; set weight_scale 1 or replacement true")

    @property
    def scale(self) -> float:
        return self.setup.fc.weight_scale if self.replacement else 1.0

    def begin(self, pid: int, round_: int, start: Tensor, model: nn.Module) -> None:
        self.steps = 0
        if self.scratch.shape != start.shape or self.scratch.device != start.device:
            self.scratch = torch.empty_like(start)

    def after_step(self, flat: FlatModel, start: Tensor) -> None:
        self.steps += 1
        if self.steps % self.project_every == 0:
            project_model(flat, start, self.eps / self.scale, self.scratch)

    def finish(self, update: Tensor, pid: int, round_: int) -> None:
        update.mul_(self.scale)
        project_l2_(update, self.eps)
