"""Federated learning: data splits, client training, aggregators (pure rules in
`aggregation.py`; the interface in `aggregator.py`; registered rules in `aggregators.py`,
`selection.py`, one module per newer rule and the composable wrappers in `wrappers.py`;
see docs/federated_robust.md), attackers (`attackers/`), client engines (`engine.py`) and the round
loop (`loop.py`). See docs/federated.md. Importing the package registers every
aggregator in AGGREGATORS and every attacker in ATTACKERS."""

from backdoors.federated import (  # noqa: F401 - registers the rules
    aggregators,
    bulyan,
    centered_clipping,
    crfl,
    fltrust,
    rlr,
    selection,
    wrappers,
)
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext
from backdoors.federated.attackers import ATTACKERS, Attacker, AttackerSetup

__all__ = ["AGGREGATORS", "ATTACKERS", "Aggregate", "Aggregator", "Attacker", "AttackerSetup",
           "RoundContext"]
