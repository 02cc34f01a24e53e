"""Anti-Backdoor Learning: poisoned samples are learned fastest; isolate them, unlearn them."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.defenses.base import DEFENSES, DefenseData, TrainingDefense
from backdoors.defenses.results import Trained
from backdoors.defenses.target import TrainingBudget
from backdoors.defenses.training import accuracy, predict
from backdoors.errors import DataError
from backdoors.execution import Accelerated, LossScaler
from backdoors.training.optim import make_optimizer, make_scheduler


def lga_loss(loss: Tensor, gamma: float) -> Tensor:
    """Local gradient ascent: sign(L - gamma) * L. Below gamma the batch loss is pushed back
    up, so clean samples hover around gamma while the quickly learned poison sinks to 0."""
    return torch.sign(loss.detach() - gamma) * loss


@torch.no_grad()
def sample_losses(model: nn.Module, data: DefenseData) -> Tensor:
    """Cross-entropy of every training sample (eval mode, no augmentation), dataset order."""
    assert data.train is not None
    logits, labels = predict(model, data.train, data)
    return F.cross_entropy(logits, labels, reduction="none")


def lowest(values: Tensor, share: float) -> Tensor:
    """Boolean mask of the max(1, round(share * N)) smallest values."""
    k = min(len(values), max(1, int(round(share * len(values)))))
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[values.topk(k, largest=False).indices] = True
    return mask


@DEFENSES.register("abl")
class AntiBackdoorLearning(TrainingDefense):
    """Anti-Backdoor Learning (arXiv 2110.11571): isolate the lowest-loss samples, unlearn them.

    Li, Lyu, Koren, Lyu, Li, Ma, "Anti-Backdoor Learning: Training Clean Models on
    Poisoned Data" (NeurIPS 2021).

    Trains a fresh model on the poisoned training set within the victim's budget (its
    epochs, batch size, optimizer, lr, schedule and augmentation):

    1. Isolation: for `isolation_epochs` the loss is local gradient ascent,
       sign(L - `gamma`) * L on each batch's mean cross-entropy (gamma 0.5, as the paper's
       code). Default: 20% of the run's epochs, at least 1 (the paper: 20 of 100).
    2. The `isolation_ratio` (0.01) of training samples with the lowest loss are set
       apart; their loss is the suspicion score (lower loss = more suspicious).
    3. Training continues with plain cross-entropy on the other samples for the rest of
       the run's epochs.
    4. Unlearning: `unlearning_epochs` (5) of gradient ascent (minimising -CE) on the
       isolated samples, SGD lr `unlearning_lr` (5e-4), momentum 0.9, the paper's values;
       on the 1% this adds about 5% of an epoch to the budget. A step that costs more than
       `max_accuracy_drop` (0.04) of the clean budget's accuracy is undone and unlearning
       stops there (the paper's code keeps a checkpoint per epoch for the user to pick);
       this guard is the only use of the clean budget.

    The paper's gamma and unlearning values suit CIFAR-scale training; tasks learned
    within an epoch need a lower gamma and stronger unlearning (docs/defenses.md).
    """

    def __init__(self, isolation_epochs: int | None = None, isolation_ratio: float = 0.01,
                 gamma: float = 0.5, unlearning_epochs: int = 5, unlearning_lr: float = 5e-4,
                 max_accuracy_drop: float = 0.04, **base: Any) -> None:
        super().__init__(**base)
        if isolation_epochs is not None and isolation_epochs < 1:
            raise ValueError(f"isolation_epochs must be >= 1, got {isolation_epochs}")
        if not 0.0 < isolation_ratio < 1.0:
            raise ValueError(f"isolation_ratio must be in (0, 1), got {isolation_ratio}")
        if gamma < 0 or unlearning_epochs < 0 or unlearning_lr <= 0 or max_accuracy_drop < 0:
            raise ValueError("gamma, unlearning_epochs and max_accuracy_drop must be >= 0, "
                             "unlearning_lr > 0")
        self.isolation_epochs, self.isolation_ratio = isolation_epochs, isolation_ratio
        self.gamma, self.unlearning_epochs = gamma, unlearning_epochs
        self.unlearning_lr, self.max_accuracy_drop = unlearning_lr, max_accuracy_drop

    def train(self, model: nn.Module, data: DefenseData, budget: TrainingBudget) -> Trained:
        if not isinstance(data.train, ArrayDataset):
            raise DataError("abl needs an in-memory training set")
        tc = budget.train
        epochs = tc.epochs - tc.start_epoch + 1
        isolation = self.isolation_epochs or max(1, int(round(0.2 * epochs)))
        isolation = min(isolation, epochs)
        optimizer = make_optimizer(model, tc)
        scheduler = make_scheduler(optimizer, tc)
        forward = Accelerated(model, data.device, data.precision)
        scaler = LossScaler(data.precision, data.device)

        def fit(dataset: ArrayDataset, rounds: int, gamma: float | None) -> None:
            loader = Loader(dataset, tc.batch_size, data.device, shuffle=True,
                            generator=data.generator, augment=budget.augment)
            what = "isolating (gradient ascent below gamma)" if gamma is not None else "training"
            for _ in data.progress.phase(range(rounds), what):
                model.train()
                for batch in loader:
                    loss = F.cross_entropy(forward(batch.inputs), batch.labels)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.backward(loss if gamma is None else lga_loss(loss, gamma))
                    scaler.step(optimizer)
                if scheduler is not None:
                    scheduler.step()

        fit(data.train, isolation, self.gamma)
        losses = sample_losses(model, data).cpu()
        isolated = lowest(losses, self.isolation_ratio)
        fit(data.train.subset((~isolated).nonzero().flatten()), epochs - isolation, None)
        unlearned = self._unlearn(model, data, data.train.subset(isolated.nonzero().flatten()),
                                  tc.batch_size)
        return Trained(model=model.eval(), scores=-losses, flagged=isolated, figures={
            "isolation_epochs": isolation,
            "isolation_loss_threshold": float(losses[isolated].max()), **unlearned})

    def _unlearn(self, model: nn.Module, data: DefenseData, isolated: ArrayDataset,
                 batch_size: int) -> dict[str, Any]:
        """Gradient ascent on the isolated samples: the trigger -> target shortcut is what
        they share, so raising their loss breaks it. Ascent has no minimum; once the
        shortcut is gone it erodes everything else, so each step is kept only while the
        clean budget's accuracy stays within `max_accuracy_drop` of where it started."""
        optimizer = torch.optim.SGD(model.parameters(), lr=self.unlearning_lr, momentum=0.9)
        forward = Accelerated(model, data.device, data.precision)
        scaler = LossScaler(data.precision, data.device)
        loader = Loader(isolated, batch_size, data.device, shuffle=True,
                        generator=data.generator)
        start = kept = accuracy(model, data.clean, data)
        steps = 0
        for _ in data.progress.phase(range(self.unlearning_epochs), "unlearning isolated"):
            for batch in loader:
                saved = copy.deepcopy(model.state_dict())
                model.train()
                optimizer.zero_grad(set_to_none=True)
                scaler.backward(-F.cross_entropy(forward(batch.inputs), batch.labels))
                scaler.step(optimizer)
                current = accuracy(model, data.clean, data)
                if current < start - self.max_accuracy_drop:
                    model.load_state_dict(saved)
                    return {"unlearning_steps": steps, "unlearning_stopped": True,
                            "clean_budget_accuracy": kept}
                steps, kept = steps + 1, current
        return {"unlearning_steps": steps, "unlearning_stopped": False,
                "clean_budget_accuracy": kept}
