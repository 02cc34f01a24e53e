"""Injection methods: how a backdoor gets into the model, orthogonal to the trigger."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.data.dataset import Dataset
from backdoors.registry import Registry
from backdoors.synthesizers.base import Synthesizer

ATTACKS: Registry[Attack] = Registry("attack")


@dataclass
class StepReport:
    """What one training step reports: the loss of each term and the weight it got."""

    losses: dict[str, float]
    scales: dict[str, float]


class Attack(ABC):
    """Base class. The trainer calls `backward(model, batch)` once per step; the attack
    computes its losses and fills the gradients. `poison_training_set` runs once before
    training (data poisoning); most attacks leave the training set alone."""

    synthesizer: Synthesizer

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def bind(self, synthesizer: Synthesizer, model: nn.Module) -> None:
        """Learn the trigger (at build time, before any data or weights load)."""
        self.synthesizer = synthesizer

    def start(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Training is about to start with these (possibly pretrained) weights."""

    def poison_training_set(
        self, dataset: Dataset, generator: torch.Generator
    ) -> tuple[Dataset, Tensor]:
        """Return the training set to use and the indices of poisoned samples."""
        return dataset, torch.empty(0, dtype=torch.long)

    @abstractmethod
    def backward(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> StepReport:
        """Compute this step's losses and accumulate their gradients into the model."""

    def state_dict(self) -> dict[str, Any]:
        """Running state to checkpoint (for exact resume)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore what `state_dict` returned."""


def cross_entropy_step(model: nn.Module, batch: Batch) -> StepReport:
    """One plain cross-entropy backward pass, reported as the `normal` task."""
    loss = F.cross_entropy(model(batch.inputs), batch.labels)
    loss.backward()
    return StepReport({"normal": float(loss.detach())}, {"normal": 1.0})
