"""Federated learning: data splits, client training, aggregators (pure rules in
`aggregation.py`; the interface in `aggregator.py`; registered rules in `aggregators.py`,
`selection.py`, one module per newer rule (docs/federated_robust.md), the detectors
`deepsight.py`, `fldetector.py`, `indicator.py` (docs/federated_detection.md) and the
composable wrappers in `wrappers.py`), attackers (`attackers/`), client engines
(`engine.py`) and the round loop (`loop.py`). See docs/federated.md. Importing the
package registers every aggregator in AGGREGATORS and every attacker in ATTACKERS."""

from backdoors.federated import (  # noqa: F401 - registers the rules
    aggregators,
    bulyan,
    centered_clipping,
    crfl,
    deepsight,
    fldetector,
    fltrust,
    indicator,
    rlr,
    selection,
    wrappers,
)
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext
from backdoors.federated.attackers import ATTACKERS, Attacker, AttackerSetup

__all__ = ["AGGREGATORS", "ATTACKERS", "Aggregate", "Aggregator", "Attacker", "AttackerSetup",
           "RoundContext"]
