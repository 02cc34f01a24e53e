"""Defenses; importing this package registers them all in DEFENSES."""

from backdoors.defenses import (  # noqa: F401 - importing a module registers its defense
    activation_clustering,
    fine_pruning,
    fine_tuning,
    neural_cleanse,
    spectral_signatures,
    strip,
)
from backdoors.defenses.base import (
    DEFENSES,
    DatasetSanitizer,
    Defense,
    DefenseData,
    DefenseResult,
    InputDetector,
    ModelInspector,
    ModelRepair,
)

__all__ = [
    "DEFENSES", "DatasetSanitizer", "Defense", "DefenseData", "DefenseResult", "InputDetector",
    "ModelInspector", "ModelRepair",
]
