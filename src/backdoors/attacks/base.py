"""Injection methods: how a backdoor gets into the model, orthogonal to the trigger."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.data.dataset import Dataset
from backdoors.execution.precision import scaled
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

    def carried_state(self) -> str | None:
        """What in this attack's training depends on state earlier training left in it
        (one line naming the option), or None. Federated clients trained in parallel
        (the Ray engine) cannot replay the order such state builds up in."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Running state to checkpoint (for exact resume)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore what `state_dict` returned."""


def cross_entropy_step(model: nn.Module, batch: Batch) -> StepReport:
    """One plain cross-entropy backward pass, reported as the `normal` task."""
    loss = F.cross_entropy(model(batch.inputs), batch.labels)
    scaled(loss).backward()
    return StepReport({"normal": float(loss.detach())}, {"normal": 1.0})


# A privacy unit's losses: (forward, *unit rows) -> {term: scalar loss}.
UnitLosses = Callable[..., dict[str, Tensor]]


@dataclass
class PerSampleStep:
    """One training step written as a mean over privacy units, for DP-SGD.

    `rows` are tensors with one row per unit (leading dimension N). `losses(forward, *unit)`
    receives one unit's rows (leading dimension removed) and `forward`, the model as a pure
    function of its inputs, and returns that unit's loss for each term. `scales` weight the
    terms; they are decided once per step on the whole batch (e.g. MGDA) and then held
    fixed. The step's loss is mean_i sum_t scales[t] * losses_i[t], which equals what
    `Attack.backward` differentiates.
    """

    rows: tuple[Tensor, ...]
    losses: UnitLosses
    scales: dict[str, float]


class PerSampleAttack(Attack):
    """An attack whose step can be written per sample, so DP-SGD (backdoors.training.dp)
    can clip each sample's gradient. Attacks without this base are refused under DP."""

    def dp_blocker(self) -> str | None:
        """Why this configuration has no per-sample form (DP-SGD refuses it), or None."""
        return None

    @abstractmethod
    def per_sample_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> PerSampleStep:
        """This step's losses per privacy unit; draws the same randomness as `backward`."""


def cross_entropy_rows(batch: Batch) -> PerSampleStep:
    """`cross_entropy_step` per sample: each row is its own privacy unit."""

    def losses(forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"normal": F.cross_entropy(forward(x[None]), y[None])}

    return PerSampleStep((batch.inputs, batch.labels), losses, {"normal": 1.0})
