"""Defense stages: one small ABC per stage; the runner owns data access and evaluation.

Each defense declares what it may see (`uses_training_set`: the possibly poisoned
training set, for dataset-level and training-time defenses; `clean_fraction`: the size of
the clean budget as a fraction of the training set, default 5% as in BackdoorBench). The
runner hands it a DefenseData with exactly that, and never test labels, the trigger or
poison indices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from backdoors.config import TrainConfig
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.data.loader import Augment, Loader
from backdoors.registry import Registry

DEFENSES: Registry[Defense] = Registry("defense")


@dataclass
class DefenseData:
    """What a defense is given. `clean` is a small labelled clean set (the budget);
    `train` is the training set as the victim received it (None unless the defense
    declared `uses_training_set`)."""

    clean: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    device: torch.device
    generator: torch.Generator
    train: Dataset | None = None
    batch_size: int = 128

    def loader(self, ds: Dataset, shuffle: bool = False, augment: Any = None) -> Loader:
        return Loader(ds, self.batch_size, self.device, shuffle=shuffle,
                      generator=self.generator, augment=augment)


@dataclass
class DefenseResult:
    """What a defense reports besides what the runner measures. `artifacts` maps file
    names to PNG-ready figures' data (the runner writes them)."""

    figures: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Tensor] = field(default_factory=dict)


class Defense(ABC):
    """Base class of every stage."""

    stage: ClassVar[str]
    uses_training_set: ClassVar[bool] = False

    def __init__(self, clean_fraction: float = 0.05) -> None:
        if not 0.0 < clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in (0, 1], got {clean_fraction}")
        self.clean_fraction = clean_fraction

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)


class InputDetector(Defense):
    """Scores test-time inputs: higher = more likely triggered (STRIP, SentiNet, ...)."""

    stage = "input"

    def fit(self, model: nn.Module, data: DefenseData) -> None:  # noqa: B027 - optional
        """Calibrate on the clean budget before scoring (optional)."""

    @abstractmethod
    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """Suspicion per input of the pixel batch x."""


class DatasetSanitizer(Defense):
    """Scores training samples: higher = more likely poisoned (spectral signatures, ...)."""

    stage = "dataset"
    uses_training_set = True
    # Figures beyond the scores (e.g. flagged classes); set by `score` where it has any.
    last_result: DefenseResult = DefenseResult()

    @abstractmethod
    def score(self, model: nn.Module, data: DefenseData) -> Tensor:
        """Suspicion per sample of data.train, in dataset order."""

    @abstractmethod
    def removed(self, scores: Tensor) -> Tensor:
        """The samples the defense's own rule removes (bool per sample of data.train),
        given the scores `score` just returned; the runner reports their recall and
        precision next to the threshold-free AUROC."""


class ModelInspector(Defense):
    """Says whether a model is backdoored and which class is the target (Neural Cleanse)."""

    stage = "inspection"

    @abstractmethod
    def inspect(self, model: nn.Module, data: DefenseData) -> tuple[Tensor, DefenseResult]:
        """Anomaly index per class (> 2 flags the class) and extra figures/artifacts."""


class ModelRepair(Defense):
    """Returns a repaired model (fine-tuning, fine-pruning, NAD, ANP, I-BAU, ...)."""

    stage = "repair"

    @abstractmethod
    def repair(self, model: nn.Module, data: DefenseData) -> tuple[nn.Module, DefenseResult]:
        """A repaired copy of the model (the input model is left as it was)."""


@dataclass
class TrainingBudget:
    """What the victim's training used, so a training-time defense trains within it: the
    run's train section (epochs, batch size, optimizer, lr, schedule) and the task's
    training augmentation (None when the task has none)."""

    train: TrainConfig
    augment: Augment | None = None


@dataclass
class Trained:
    """What a training-time defense returns: its model, optionally a suspicion score per
    training sample (higher = more likely poisoned) and the samples it set apart."""

    model: nn.Module
    scores: Tensor | None = None
    flagged: Tensor | None = None
    result: DefenseResult = field(default_factory=DefenseResult)


class TrainingDefense(Defense):
    """Trains a model itself on the poisoned training set, in place of the victim's
    training (ABL, ...). Gets a freshly initialised model of the run's architecture, the
    training set as the victim received it, and the run's training budget."""

    stage = "training"
    uses_training_set = True

    @abstractmethod
    def train(self, model: nn.Module, data: DefenseData, budget: TrainingBudget) -> Trained:
        """Train `model` (fresh weights) on data.train and return the outcome."""
