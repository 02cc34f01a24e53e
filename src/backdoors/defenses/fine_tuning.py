"""Fine-tuning: the simplest repair, and the baseline every other repair must beat."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import accuracy, finetune


@DEFENSES.register("fine_tuning")
class FineTuning(ModelRepair):
    """Fine-tuning on the clean budget (BackdoorBench's FT baseline, arXiv 2206.12654).

    Also the second half of Fine-Pruning (arXiv 1805.12185), which argues that fine-tuning
    alone rarely removes a backdoor: clean data leaves the backdoor's neurons dormant.

    Defaults, BackdoorBench-style: `epochs` 10, SGD with `lr` 0.01, `momentum` 0.9,
    `weight_decay` 5e-4; `batch_size` 64 (the framework's training default); the clean
    budget is `clean_fraction` (5%) of the training set. No augmentation.
    """

    def __init__(
        self,
        epochs: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 64,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if epochs < 0 or lr <= 0 or batch_size < 1:
            raise ValueError("epochs must be >= 0, lr > 0 and batch_size >= 1")
        self.epochs, self.lr, self.momentum = epochs, lr, momentum
        self.weight_decay, self.batch_size = weight_decay, batch_size

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        model = copy.deepcopy(model)
        before = accuracy(model, data.clean, data)
        finetune(model, data.clean, data, self.epochs, self.lr, self.momentum,
                 self.weight_decay, self.batch_size)
        return Repaired(model=model, figures={
            "clean_budget_accuracy_before": before,
            "clean_budget_accuracy_after": accuracy(model, data.clean, data),
        })
