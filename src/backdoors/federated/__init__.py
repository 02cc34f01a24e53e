"""Federated learning: data splits, client training, aggregators (pure rules in
`aggregation.py`; the interface in `aggregator.py`; registered rules in `aggregators.py`,
`selection.py` and the detectors `deepsight.py`, `fldetector.py`, `indicator.py`),
attackers (`attackers/`), client engines (`engine.py`) and the round loop (`loop.py`).
See docs/federated.md and docs/federated_detection.md. Importing the package registers
every aggregator in AGGREGATORS and every attacker in ATTACKERS."""

from backdoors.federated import (  # noqa: F401 - registers the rules
    aggregators,
    deepsight,
    fldetector,
    indicator,
    selection,
)
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext
from backdoors.federated.attackers import ATTACKERS, Attacker, AttackerSetup

__all__ = ["AGGREGATORS", "ATTACKERS", "Aggregate", "Aggregator", "Attacker", "AttackerSetup",
           "RoundContext"]
