"""Defense stages: one small ABC per stage, each owning how its defenses are measured.

Each defense declares what it may see (`uses_training_set`: the possibly poisoned
training set, for dataset-level and training-time defenses; `uses_clean_data`: False for
data-free defenses, which then get an empty clean budget; `clean_fraction`: the size of
the clean budget as a fraction of the training set, default 5% as in BackdoorBench). The
runner hands it a DefenseData with exactly that, and never test labels, the trigger or
poison indices. A stage's `measure` runs the defense and judges it with the figures that
fit the stage (defenses/measure.py); a new defense implements only its stage's method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.data.loader import Loader
from backdoors.defenses.measure import detection, input_detection, mitigation, recall_at, removal
from backdoors.defenses.progress import SILENT, Progress
from backdoors.defenses.results import Inspection, Outcome, Repaired, Sanitized, Trained
from backdoors.defenses.target import DefenseTarget, TrainingBudget
from backdoors.registry import Registry
from backdoors.runs import load_into

DEFENSES: Registry[Defense] = Registry("defense")


@dataclass
class DefenseData:
    """What a defense is given. `clean` is a small labelled clean set (the budget);
    `train` is the training set as the victim received it (None unless the defense
    declared `uses_training_set`). `precision` is the run's: the shared fine-tuning
    (defenses/training.py) and the defenses' own training loops train in it."""

    clean: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    device: torch.device
    generator: torch.Generator
    train: Dataset | None = None
    batch_size: int = 128
    progress: Progress = SILENT  # shows long phases on a terminal
    precision: str = "fp32"  # the run's train.precision, for defenses that train

    def loader(self, ds: Dataset, shuffle: bool = False, augment: Any = None) -> Loader:
        return Loader(ds, self.batch_size, self.device, shuffle=shuffle,
                      generator=self.generator, augment=augment)


class Defense(ABC):
    """Base class of every stage."""

    stage: ClassVar[str]
    uses_training_set: ClassVar[bool] = False
    uses_clean_data: ClassVar[bool] = True

    def __init__(self, clean_fraction: float = 0.05) -> None:
        if not 0.0 < clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in (0, 1], got {clean_fraction}")
        self.clean_fraction = clean_fraction

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    @abstractmethod
    def measure(self, model: nn.Module, data: DefenseData, target: DefenseTarget,
                before: dict[str, Any]) -> Outcome:
        """Run the defense on `model` (a copy of the attacked one, which scored `before`)
        and judge it."""

    def restore(self, model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
        """The model this defense made, rebuilt from its saved weights `state` on `model`
        (a copy of the attacked one), so another defense can run on it. A defense that
        changes the architecture (pruning masks, inserted layers) rebuilds it here."""
        load_into(model, state, f"the model {self.name} made")
        return model


class InputDetector(Defense):
    """Scores test-time inputs: higher = more likely triggered (STRIP, SentiNet, ...).

    The stage judges a detector by its scores alone (AUROC, TPR at 5% FPR, the
    clean/triggered histogram). A detector that calibrates on the clean budget (SCALE-UP's
    class statistics, IBD-PSC's layer selection, Beatrix's ranges) may also fill
    `self.figures` (into result.json) and `self.artifacts` (PNGs), the numbers a person
    checks when a detection fails. It may `keep` something per scored input (TeCo's
    first-flip severities, Cognitive Distillation's patterns); once scored, `describe`
    gets it with the inputs marked clean or triggered, to show what tells them apart.
    """

    stage = "input"

    def __init__(self, test_inputs: int | None = None, **base: Any) -> None:
        """`test_inputs`: score only the first N clean and the first N triggered test
        inputs (default: all), for detectors that cost much per input (TeCo's 60
        corrupted copies, Cognitive Distillation's optimisation)."""
        super().__init__(**base)
        if test_inputs is not None and test_inputs < 1:  # the registry checks the type
            raise ValueError(f"test_inputs must be a positive integer, got {test_inputs!r}")
        self.test_inputs = test_inputs
        self.figures: dict[str, Any] = {}
        self.artifacts: dict[str, Tensor] = {}
        self._kept: list[Tensor] | None = None

    def fit(self, model: nn.Module, data: DefenseData) -> None:  # noqa: B027 - optional
        """Calibrate on the clean budget before scoring (optional)."""

    @abstractmethod
    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """Suspicion per input of the pixel batch x."""

    def keep(self, values: Tensor) -> None:
        """Record `values` [N, ...] of the N inputs just scored (only while measuring)."""
        if self._kept is not None:
            self._kept.append(values.detach().cpu())

    def describe(self, kept: Tensor, positive: Tensor) -> None:  # noqa: B027 - optional
        """Turn what `score` kept, one row per scored input in scoring order, into
        figures and artifacts; `positive` marks the triggered inputs."""

    def measure(self, model: nn.Module, data: DefenseData, target: DefenseTarget,
                before: dict[str, Any]) -> Outcome:
        self.fit(model, data)
        self._kept = []
        try:
            figures, scores, positive = input_detection(self.score, model, target,
                                                        data.progress, self.test_inputs)
            kept = self._kept
        finally:
            self._kept = None
        if kept:
            self.describe(torch.cat(kept), positive)
        return Outcome(figures={**figures, **self.figures},
                       artifacts={"scores": scores, "positive": positive, **self.artifacts})


class DatasetSanitizer(Defense):
    """Scores training samples: higher = more likely poisoned (spectral signatures, ...)."""

    stage = "dataset"
    uses_training_set = True

    @abstractmethod
    def sanitize(self, model: nn.Module, data: DefenseData) -> Sanitized:
        """Suspicion per sample of data.train (dataset order) and the samples the defense's
        own rule removes."""

    def measure(self, model: nn.Module, data: DefenseData, target: DefenseTarget,
                before: dict[str, Any]) -> Outcome:
        found = self.sanitize(model, data)
        scores, poisoned = found.scores.cpu(), target.poisoned
        figures = {**detection(scores, poisoned),
                   "recall_at_1_5x": recall_at(scores, poisoned, 1.5),
                   **removal(found.removed.cpu(), poisoned, "removed"), **found.figures}
        return Outcome(figures=figures, artifacts={"scores": scores, "positive": poisoned,
                                                   **found.artifacts})


class ModelInspector(Defense):
    """Says whether a model is backdoored and which class is the target (Neural Cleanse).
    An inspector may also repair what it found (`unlearn`)."""

    stage = "inspection"

    @abstractmethod
    def inspect(self, model: nn.Module, data: DefenseData) -> Inspection:
        """Anomaly index per class (> 2 flags a class, by default) and flagged classes."""

    def unlearn(self, model: nn.Module, data: DefenseData, found: Inspection
                ) -> Repaired | None:
        """A repaired copy of the model from what `inspect` found; None: no repair."""
        return None

    def measure(self, model: nn.Module, data: DefenseData, target: DefenseTarget,
                before: dict[str, Any]) -> Outcome:
        found = self.inspect(model, data)
        index = found.anomaly_index.cpu()
        backdoor = target.synthesizer.backdoor_target()
        figures: dict[str, Any] = {
            "anomaly_index": index.tolist(), "flagged_classes": list(found.flagged),
            "target_flagged": None if backdoor is None else backdoor in found.flagged,
            "target_anomaly_index": float(index[backdoor])
            if backdoor is not None and backdoor < len(index) else None,
        }
        artifacts = dict(found.artifacts)
        repaired = self.unlearn(model, data, found)
        if repaired is not None:
            figures.update(mitigation(target, before, repaired.model))
            figures.update(repaired.figures)
            artifacts.update(repaired.artifacts)
        return Outcome(figures={**figures, **found.figures}, artifacts=artifacts,
                       model=None if repaired is None else repaired.model)


class ModelRepair(Defense):
    """Returns a repaired model (fine-tuning, fine-pruning, NAD, ANP, I-BAU, ...)."""

    stage = "repair"

    @abstractmethod
    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        """A repaired copy of the model (the input model is left as it was)."""

    def measure(self, model: nn.Module, data: DefenseData, target: DefenseTarget,
                before: dict[str, Any]) -> Outcome:
        repaired = self.repair(model, data)
        return Outcome(figures={**mitigation(target, before, repaired.model),
                                **repaired.figures},
                       artifacts=repaired.artifacts, model=repaired.model)


class TrainingDefense(Defense):
    """Trains a model itself on the poisoned training set, in place of the victim's
    training (ABL, ...). Gets a freshly initialised model of the run's architecture, the
    training set as the victim received it, and the run's training budget."""

    stage = "training"
    uses_training_set = True

    @abstractmethod
    def train(self, model: nn.Module, data: DefenseData, budget: TrainingBudget) -> Trained:
        """Train `model` (fresh weights) on data.train and return the outcome."""

    def measure(self, model: nn.Module, data: DefenseData, target: DefenseTarget,
                before: dict[str, Any]) -> Outcome:
        trained = self.train(target.fresh_model(), data, target.budget)
        model = trained.model.eval()
        figures: dict[str, Any] = {}
        artifacts = dict(trained.artifacts)
        if trained.scores is not None:
            figures.update(detection(trained.scores.cpu(), target.poisoned))
            artifacts.update(scores=trained.scores.cpu(), positive=target.poisoned)
        if trained.flagged is not None:
            figures.update(removal(trained.flagged.cpu(), target.poisoned, "isolated"))
        figures.update(mitigation(target, before, model))
        return Outcome(figures={**figures, **trained.figures}, artifacts=artifacts,
                       model=model)
