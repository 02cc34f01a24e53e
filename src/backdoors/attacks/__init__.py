"""Injection methods, loss terms and balancers; importing registers them all."""

from backdoors.attacks import blind, evasion, model_distance, poisoning  # noqa: F401
from backdoors.attacks.balancers import BALANCERS, Balancer
from backdoors.attacks.base import ATTACKS, Attack, StepReport
from backdoors.attacks.loss_terms import LOSS_TERMS, LossContext, LossTerm

__all__ = [
    "ATTACKS", "BALANCERS", "LOSS_TERMS", "Attack", "Balancer", "LossContext", "LossTerm",
    "StepReport",
]
