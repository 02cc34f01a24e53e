"""Constrain-and-scale: train close to the global model, then scale within a norm bound."""

from __future__ import annotations

from torch import Tensor

from backdoors.attacks.base import Attack
from backdoors.attacks.model_distance import ModelDistance
from backdoors.federated.attackers.base import ATTACKERS, Attacker, AttackerSetup
from backdoors.federated.attackers.constraints import project_l2_
from backdoors.federated.attackers.penalized import Penalized


@ATTACKERS.register("constrain_and_scale")
class ConstrainAndScale(Attacker):
    """Constrain-and-scale ("How To Backdoor Federated Learning", Bagdasaryan et al.,
    AISTATS 2020, arXiv 1807.00459, Section 4 "Evading anomaly detection").

    Local training minimises alpha * L_class + (1 - alpha) * L_ano, where L_class is the
    config's injection method (any of them) and L_ano the `model_distance` loss term, the
    L2 distance to the global model; `alpha` default 0.7 (the paper sweeps alpha rather
    than fixing one; 0.7 is a middle setting). The update is then scaled by
    gamma = min(weight_scale, bound / ||update||), the largest boost that keeps it
    within the L2 norm bound S (`bound`) the attacker assumes the server enforces, so
    the sent update has norm <= S; without a bound (default) gamma = weight_scale, as
    in plain model replacement.
    """

    def __init__(self, alpha: float = 0.7, bound: float | None = None) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if bound is not None and bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self.alpha, self.bound = alpha, bound

    def bind(self, setup: AttackerSetup) -> None:
        super().bind(setup)
        self.attack = Penalized(setup.attack, ModelDistance(), self.alpha, "anomaly")

    def injection(self, pid: int) -> Attack:
        return self.attack

    def finish(self, update: Tensor, pid: int, round_: int) -> None:
        gamma = self.setup.fc.weight_scale
        norm = float(update.norm())
        if self.bound is not None and norm > 0:
            gamma = min(gamma, self.bound / norm)
        update.mul_(gamma)
        if self.bound is not None:
            project_l2_(update, self.bound)  # only absorbs the rounding of the scaling
