"""Defenses; importing this package registers them all in DEFENSES."""

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
