"""Federated attackers: what compromised clients do with their local training. Importing
the package registers every attacker in ATTACKERS."""

from backdoors.federated.attackers import (  # noqa: F401 - registration
    chameleon,
    constrain_and_scale,
    dba,
    neurotoxin,
    pgd,
)
from backdoors.federated.attackers.base import ATTACKERS, Attacker, AttackerSetup

__all__ = ["ATTACKERS", "Attacker", "AttackerSetup"]
