"""What a defense is run against: a finished attack run, as the lifecycle re-opens it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.config import TrainConfig
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.data.loader import Augment, Loader
from backdoors.synthesizers.base import Synthesizer


@dataclass
class TrainingBudget:
    """What the victim's training used, so a training-time defense trains within it: the
    run's train section (epochs, batch size, optimizer, lr, schedule) and the task's
    training augmentation (None when the task has none)."""

    train: TrainConfig
    augment: Augment | None = None


@dataclass
class DefenseTarget:
    """A trained (possibly backdoored) model with the data of its run.

    `clean_train` is the training set before the attack touched it, without the rows the
    trigger took out of the main task; `train` is the same rows as the victim received
    them (None for a federated run: no server holds the clients' data), and `poisoned`
    marks, per row of both, the rows the attack changed. Row i of one is row i of the
    other, so the clean budget drawn from rows not marked is provably clean.
    """

    model: nn.Module
    clean_train: ArrayDataset
    train: Dataset | None
    poisoned: Tensor
    synthesizer: Synthesizer
    test_loader: Loader
    backdoor_loader: Loader | None
    evaluate: Callable[[nn.Module], dict[str, Any]]
    fresh_model: Callable[[], nn.Module]
    budget: TrainingBudget
    num_classes: int
    input_shape: tuple[int, int, int]
    device: torch.device
    seed: int
    batch_size: int
    federated: bool = False
