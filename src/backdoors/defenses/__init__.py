"""Defenses; importing this package registers them all in DEFENSES."""

from backdoors.defenses import (  # noqa: F401 - importing a module registers its defense
    abl,
    activation_clustering,
    anp,
    asd,
    beatrix,
    bnp,
    bti_dbf,
    clp,
    cognitive_distillation,
    dbd,
    ep,
    fine_pruning,
    fine_tuning,
    ft_sam,
    i_bau,
    ibd_psc,
    mm_bd,
    nad,
    neural_cleanse,
    npd,
    rnp,
    sau,
    scale_up,
    scan,
    sentinet,
    spectral_signatures,
    spectre,
    strip,
    teco,
)
from backdoors.defenses.base import (
    DEFENSES,
    DatasetSanitizer,
    Defense,
    DefenseData,
    InputDetector,
    ModelInspector,
    ModelRepair,
    TrainingDefense,
)
from backdoors.defenses.results import (
    DefenseResult,
    Inspection,
    Outcome,
    Repaired,
    Sanitized,
    Trained,
)
from backdoors.defenses.target import DefenseTarget, TrainingBudget

__all__ = [
    "DEFENSES", "DatasetSanitizer", "Defense", "DefenseData", "DefenseResult", "DefenseTarget",
    "InputDetector", "Inspection", "ModelInspector", "ModelRepair", "Outcome", "Repaired",
    "Sanitized", "Trained", "TrainingBudget", "TrainingDefense",
]
