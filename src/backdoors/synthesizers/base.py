"""Synthesizer base: turns clean rows of a batch into backdoor rows (inputs and labels).

Blind Backdoors (Bagdasaryan & Shmatikov, arXiv 2005.03823) frames a backdoor as a second
task; a synthesizer produces that task's inputs and labels from the main task's batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.errors import ConfigError
from backdoors.registry import Registry

if TYPE_CHECKING:
    from backdoors.data.dataset import ArrayDataset, Dataset

SYNTHESIZERS: Registry[Synthesizer] = Registry("synthesizer")

LabelMode = Literal["all_to_one", "all_to_all"]


class Synthesizer(ABC):
    """Base class: subclasses implement `synthesize_inputs` (and may override labels).

    Label modes: `all_to_one` relabels every backdoor row to `target`; `all_to_all`
    relabels y to (y + 1) mod C. `bind(task)` tells the synthesizer the input shape and
    class count before any data loads, so it can check its geometry early. Triggers whose
    labels come from a function of the sample (`label_function`: a calculator's
    arithmetic, a complex backdoor's identities) have no single target class.
    """

    label_function: ClassVar[str | None] = None

    def __init__(self, target: int = 8, label_mode: LabelMode = "all_to_one") -> None:
        if target < 0:
            raise ValueError(f"target must be >= 0, got {target}")
        self.target = target
        self.label_mode = label_mode
        self.input_shape: tuple[int, int, int] = (1, 28, 28)
        self.num_classes = 10

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        """Learn the task's geometry; raise ValueError when the trigger cannot fit."""
        self.input_shape = tuple(input_shape)  # type: ignore[assignment]
        self.num_classes = num_classes
        if self.label_mode == "all_to_one" and self.target >= num_classes:
            raise ValueError(f"target {self.target} is not a class (task has {num_classes})")

    @abstractmethod
    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return triggered copies of the pixel batch `x` (never modify `x`)."""

    def synthesize_labels(self, batch: Batch) -> Tensor:
        """Backdoor labels for the rows of `batch` (the slice being poisoned)."""
        if self.label_mode == "all_to_all":
            return (batch.labels + 1) % self.num_classes
        return torch.full_like(batch.labels, self.target)

    def apply(
        self, batch: Batch, fraction: float = 1.0, generator: torch.Generator | None = None
    ) -> Batch:
        """A new batch whose first round(len * fraction) rows are poisoned (all when > 1).

        The first rows, not random ones: this is the Backdoors 101 convention, and batches
        are already shuffled.
        """
        n = len(batch) if fraction >= 1.0 else int(round(len(batch) * fraction))
        if n == 0:
            return batch.with_(inputs=batch.inputs.clone(), labels=batch.labels.clone())
        part = batch.select(slice(0, n))
        inputs = batch.inputs.clone()
        labels = batch.labels.clone()
        poisoned = batch.poisoned.clone()
        inputs[:n] = self.synthesize_inputs(part.inputs, generator)
        labels[:n] = self.synthesize_labels(part)
        poisoned[:n] = True
        return batch.with_(inputs=inputs, labels=labels, poisoned=poisoned)

    def backdoor_target(self) -> int | None:
        """The one class every backdoor input is sent to, or None when there is none
        (all_to_all, or a label function)."""
        if self.label_mode != "all_to_one" or self.label_function is not None:
            return None
        return self.target

    def single_target(self, where: str) -> int:
        """`backdoor_target()` for code that cannot work without one (clean-label
        poisoning, trigger-reversing evasion): a ConfigError naming `where` otherwise."""
        target = self.backdoor_target()
        if target is None:
            how = self.label_function or f"label_mode {self.label_mode}"
            raise ConfigError(f"{where} needs a single backdoor target class, but synthesizer "
                              f"'{self.name}' labels by {how}; use label_mode: all_to_one")
        return target

    def eligible(self, batch: Batch) -> Tensor:
        """Rows that count for ASR: true label differs from the backdoor label."""
        return self.synthesize_labels(batch) != batch.labels

    def spec(self) -> dict:
        """What a defense or report needs to re-create the trigger."""
        return {"name": self.name, "target": self.target, "label_mode": self.label_mode}

    # Optional hooks. Most triggers need none of them.

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:  # noqa: B027
        """Runs once after the data loads, before poisoning and training: triggers that are
        optimised on data (surrogate models, generators) or drawn from it fit here. Must be
        deterministic given `generator` (a resumed run calls it again)."""

    def state_tensors(self) -> dict[str, Tensor]:
        """Tensors that define a learned trigger, saved as the run's trigger.safetensors."""
        return {}

    def counted(self, batch: Batch) -> Tensor:
        """Rows whose backdoor prediction is scored (e.g. a complex backdoor skips rows with
        no target identity). Default: every row."""
        return torch.ones(len(batch), dtype=torch.bool, device=batch.device)

    def variants(self) -> dict[str, Synthesizer]:
        """Named sub-backdoors scored separately (e.g. a calculator's sum and product); the
        pooled figures still cover all of them. Default: none."""
        return {}

    def excluded(self, dataset: Dataset, split: str) -> Tensor | None:
        """Indices of the task's `split` ('train' or 'test') that belong to the backdoor and
        leave the main task (semantic and edge-case inputs). Default: None, keep all."""
        return None

    def backdoor_test_set(self) -> ArrayDataset | None:
        """Inputs to score the backdoor on instead of the triggered test set (semantic and
        edge-case backdoors bring their own). Default: None, use the test set."""
        return None

    def loss_weights(self, batch: Batch) -> Tensor | None:
        """Per-row weights of the backdoor loss on a poisoned batch (e.g. a complex
        backdoor down-weights rows with no target identity). Default: None, plain mean."""
        return None
