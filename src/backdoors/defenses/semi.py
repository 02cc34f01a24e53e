"""Semi-supervised training for the dataset-splitting defenses (ASD, DBD): MixMatch on a
labelled pool believed clean and the rest of the training set without its labels.

Berthelot, Carlini, Goodfellow, Papernot, Oliver, Raffel, "MixMatch: A Holistic Approach
to Semi-Supervised Learning", NeurIPS 2019 (arXiv 1905.02249). Each step takes a
labelled batch (augmented once) and an unlabelled batch (augmented K = 2 times), guesses
the unlabelled labels as the sharpened mean prediction over the two views, mixes every
input and target with a shuffled partner (MixUp with lambda' = max(lambda, 1 - lambda),
lambda ~ Beta(alpha, alpha)) and minimises the cross-entropy on the mixed labelled part
plus lambda_u times the squared error on the mixed unlabelled part, lambda_u ramped up
linearly. Defaults are those ASD and DBD use (T 0.5, alpha 0.75, lambda_u 15).

Why it defends: the poisoned samples sit in the unlabelled pool, where their (wrong)
target label is never used; their guessed label is what the model sees in the image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.augment import random_crop_flip
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Augment
from backdoors.defenses.base import DefenseData, TrainingDefense
from backdoors.defenses.results import Outcome
from backdoors.defenses.target import DefenseTarget, TrainingBudget
from backdoors.execution import Accelerated, LossScaler
from backdoors.training.optim import make_optimizer, make_scheduler

Scheduler = torch.optim.lr_scheduler.LRScheduler


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """Rows of p raised to 1/T and renormalised: T < 1 lowers the entropy of a guess
    (T -> 0 gives the one-hot argmax), T = 1 leaves it as it is."""
    p = p.pow(1.0 / temperature)
    return p / p.sum(1, keepdim=True)


def mixup(x: Tensor, y: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """lam' (x, y) + (1 - lam') (x, y)[perm] with lam' = max(lam, 1 - lam): MixMatch's
    variant keeps each mixed sample closer to its own input, so the labelled and the
    unlabelled parts of a mixed batch stay what they were."""
    lam = max(lam, 1.0 - lam)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def mixmatch_loss(x_logits: Tensor, x_targets: Tensor, u_logits: Tensor, u_targets: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """(Lx, Lu): cross-entropy against the soft labelled targets, and the mean squared
    error between the unlabelled predictions and their guessed targets."""
    lx = -(x_targets * F.log_softmax(x_logits, 1)).sum(1).mean()
    lu = (u_logits.softmax(1) - u_targets).pow(2).mean()
    return lx, lu


def rampup(progress: float, length: float) -> float:
    """Linear ramp from 0 to 1 over `length` epochs (1 at once when length is 0)."""
    return 1.0 if length <= 0 else float(np.clip(progress / length, 0.0, 1.0))


def batches(n: int, size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled index batches over range(n), dropping each pass's last partial
    batch (as the papers' loaders do); batches shrink to n when n < size."""
    size = min(size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for b in range(n // size):
            yield order[b * size:(b + 1) * size]


def default_view(input_shape: tuple[int, int, int]) -> Augment:
    """MixMatch needs two different views of each unlabelled image; a task without
    augmentation of its own (MNIST) gets random shifts of up to 1/8 of the image (the
    papers' 4 pixels at 32) and no flips, which digits do not tolerate."""
    padding = max(1, input_shape[1] // 8)
    return lambda x, g: random_crop_flip(x, padding=padding, flip=False, generator=g)


def concat(*parts: ArrayDataset) -> ArrayDataset:
    """One in-memory dataset of the rows of `parts`, in order."""
    return ArrayDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


@dataclass
class MixMatch:
    """A MixMatch trainer: the settings every epoch of a defense shares. `iterations`
    steps make an epoch; lambda_u ramps up over `rampup` epochs."""

    num_classes: int
    batch_size: int
    iterations: int
    rampup: float
    augment: Augment
    data: DefenseData
    temperature: float = 0.5
    alpha: float = 0.75
    lambda_u: float = 15.0
    rng: np.random.Generator = field(init=False)
    # One scaler for all epochs: fp16's loss scale carries over, as it does in training.
    scaler: LossScaler = field(init=False)

    def __post_init__(self) -> None:
        # numpy's Beta sampler, seeded from the defense's generator: torch's Beta cannot
        # take a generator, and a defense must repeat itself for a given run seed.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.data.generator))
        self.rng = np.random.default_rng(seed)
        self.scaler = LossScaler(self.data.precision, self.data.device)

    def _load(self, ds: ArrayDataset, idx: Tensor) -> Tensor:
        x = ds.images[idx].to(self.data.device).float().div_(255.0)
        return self.augment(x, self.data.generator)

    def epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              labelled: ArrayDataset, unlabelled: ArrayDataset, epoch: int) -> dict[str, float]:
        """One epoch of MixMatch steps; returns the mean loss, Lx, Lu and lambda_u."""
        model.train()
        g, dev = self.data.generator, self.data.device
        forward = Accelerated(model, dev, self.data.precision)
        if len(unlabelled) == 0:  # all labelled (ASD's class-aware pool on a small set):
            unlabelled = labelled  # guessing labels of labelled images changes nothing
        x_batches = batches(len(labelled), self.batch_size, g)
        u_batches = batches(len(unlabelled), self.batch_size, g)
        sums = np.zeros(4)
        for i in range(self.iterations):
            xi, ui = next(x_batches), next(u_batches)
            x = self._load(labelled, xi)
            y = F.one_hot(labelled.labels[xi].to(dev), self.num_classes).float()
            u1, u2 = self._load(unlabelled, ui), self._load(unlabelled, ui)
            with torch.no_grad():
                guess = (forward(u1).softmax(1) + forward(u2).softmax(1)) / 2
                q = sharpen(guess, self.temperature)
            inputs, targets = torch.cat([x, u1, u2]), torch.cat([y, q, q])
            perm = torch.randperm(len(inputs), generator=g).to(dev)
            mixed, mixed_targets = mixup(inputs, targets, float(self.rng.beta(self.alpha,
                                                                               self.alpha)), perm)
            # One forward pass over the whole mixed batch: batch norm sees labelled and
            # unlabelled rows together (what the reference code's interleaving arranges).
            logits = forward(mixed)
            b = len(x)
            lx, lu = mixmatch_loss(logits[:b], mixed_targets[:b], logits[b:], mixed_targets[b:])
            weight = self.lambda_u * rampup(epoch + i / self.iterations, self.rampup)
            loss = lx + weight * lu
            optimizer.zero_grad(set_to_none=True)
            self.scaler.backward(loss)
            self.scaler.step(optimizer)
            sums += (loss.item(), lx.item(), lu.item(), weight)
        means = sums / max(1, self.iterations)
        return dict(zip(("loss", "lx", "lu", "lambda_u"), means.tolist(), strict=True))


class SplittingDefense(TrainingDefense):
    """A training-time defense that splits the training set into a labelled pool it
    believes clean and an unlabelled rest (ASD, DBD). `train` records the labelled pool
    of every epoch with `keep_pool`; `measure` then reports, for the judge only, how many
    poisoned samples each stage's last pool held (the papers' own diagnostic), the pool's
    size and poisoned count per epoch (`pool_size_per_epoch`, `pool_poisoned_per_epoch`)
    and a bar chart of the poisoned samples in the clean pool per epoch
    (`poisoned_in_clean_pool.png`). The defense never sees the poison mask."""

    def __init__(self, **base: Any) -> None:
        super().__init__(**base)
        self.pools: list[tuple[str, Tensor]] = []

    def keep_pool(self, stage: str, pool: Tensor) -> None:
        self.pools.append((stage, pool.detach().cpu().bool()))

    def measure(self, model: nn.Module, data: DefenseData, target: DefenseTarget,
                before: dict[str, Any]) -> Outcome:
        self.pools = []
        outcome = super().measure(model, data, target, before)
        poisoned = target.poisoned.bool()
        sizes = [int(pool.sum()) for _, pool in self.pools]
        hits = [int((pool & poisoned).sum()) for _, pool in self.pools]
        for (stage, _), size, hit in zip(self.pools, sizes, hits, strict=True):
            outcome.figures[f"{stage}_pool"] = size  # the stage's last epoch wins
            outcome.figures[f"{stage}_pool_poisoned"] = hit
        outcome.figures["pool_size_per_epoch"] = sizes
        outcome.figures["pool_poisoned_per_epoch"] = hits
        if hits:
            outcome.artifacts["poisoned_in_clean_pool"] = torch.tensor(hits, dtype=torch.float)
        return outcome


def training_epochs(budget: TrainingBudget) -> int:
    """The epochs the victim trained for (its budget)."""
    return budget.train.epochs - budget.train.start_epoch + 1


def semi_optimizer(model: nn.Module, budget: TrainingBudget, lr: float | None
                   ) -> tuple[torch.optim.Optimizer, Scheduler | None]:
    """Adam at `lr` without weight decay or schedule, as ASD's and DBD's code train (lr
    0.002), or, with lr None, the run's own optimizer, lr and schedule."""
    if lr is None:
        optimizer = make_optimizer(model, budget.train)
        return optimizer, make_scheduler(optimizer, budget.train)
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr), None
