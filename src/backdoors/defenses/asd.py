"""Adaptively Splitting poisoned Dataset: grow a clean pool by loss, then by meta-split."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.defenses.abl import lowest
from backdoors.defenses.base import DEFENSES, DefenseData
from backdoors.defenses.results import Trained
from backdoors.defenses.sce import sample_sce
from backdoors.defenses.semi import (
    MixMatch,
    SplittingDefense,
    concat,
    default_view,
    semi_optimizer,
    training_epochs,
)
from backdoors.defenses.target import TrainingBudget
from backdoors.errors import DataError
from backdoors.execution import Accelerated, LossScaler

# The paper's schedule: 120 epochs, class-aware split for 60, class-agnostic for 30,
# meta-split for 30; the class-aware pool grows every 5 of its 60 epochs (12 steps).
CLASS_AWARE_SHARE, CLASS_AGNOSTIC_SHARE, GROWTH_STEPS = 0.5, 0.25, 12


def seed_pool(clean: ArrayDataset, per_class: int, num_classes: int,
              generator: torch.Generator) -> ArrayDataset:
    """`per_class` random images of each class from the clean budget (fewer where the
    budget holds fewer): ASD's clean seed samples."""
    order = torch.randperm(len(clean), generator=generator)
    labels = clean.labels[order]
    rank = class_rank(torch.arange(len(order), dtype=torch.float), labels, num_classes)
    return clean.subset(order[rank < per_class].sort().values)


def class_rank(values: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Rank (0 = smallest) of each value among the values of its own class."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # by class, then by value
    starts = torch.cumsum(torch.bincount(labels, minlength=num_classes), 0) - \
        torch.bincount(labels, minlength=num_classes)
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(order)) - starts[labels[order]]
    return rank


def class_quota(epoch: int, stage_epochs: int, growth: int) -> int:
    """Lowest-loss samples per class in the class-aware pool at `epoch` (0-based): none
    at first, `growth` more after every twelfth of the stage (the paper's code: 10 more
    every 5 of 60 epochs, so 110 in its last epoch)."""
    interval = max(stage_epochs / GROWTH_STEPS, 1e-9)
    return growth * int(epoch / interval + 1e-9)


def meta_split(before: Tensor, after: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """(loss drop per sample, clean pool): the `epsilon` of samples whose loss fell least
    when a virtual copy of the model trained one more epoch on the poisoned set. Poison is
    learned fastest, so its loss falls most; hard clean samples, whose loss alone would
    keep them out, fall little and join the pool."""
    drop = before - after
    return drop, lowest(drop, epsilon)


def deep_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the deeper half of the model: the last half of the body's
    top-level blocks that have parameters, the pooling stage and the head. ASD's virtual
    model updates ResNet-18's layer3, layer4 and linear layer; this picks exactly those
    on the ResNets (stem, layer1-4) and generalises to other bodies (simple_net: its
    second convolution and the two linear layers)."""
    body = getattr(model, "body", None)
    blocks = [] if body is None else [m for m in body.children()
                                      if any(True for _ in m.parameters())]
    deep = blocks[len(blocks) - max(1, len(blocks) // 2):] if blocks else [model]
    modules = deep + [getattr(model, name) for name in ("pool", "head") if hasattr(model, name)]
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        seen.update((id(p), p) for p in module.parameters())
    return list(seen.values())


@DEFENSES.register("asd")
class AdaptiveSplit(SplittingDefense):
    """ASD (arXiv 2303.12993): split the poisoned set into a clean and a polluted pool, adaptively.

    Gao, Bai, Gu, Yang, Xia, "Backdoor Defense via Adaptively Splitting Poisoned Dataset"
    (CVPR 2023). A fresh model is trained for the run's epochs with MixMatch (defenses/
    semi.py): labels of the clean pool are used, the polluted pool is unlabelled. At the
    start of every epoch the pools are split anew from each sample's symmetric
    cross-entropy (SCE, alpha 0.1, beta 1, eval mode):

    1. Class-aware loss-guided split (the first `class_aware_epochs`; default half the
       run's epochs, the paper's 60 of 120): the clean pool is `seed_num` (10) clean
       seed images per class from the clean budget plus the n lowest-SCE samples of each
       class, n growing by `growth` (10) every twelfth of the stage (the paper: every 5
       of 60 epochs).
    2. Class-agnostic loss-guided split (`class_agnostic_epochs`; default a quarter of
       the run, the paper's 30 of 120): the clean pool is the `epsilon` (0.5) of all
       samples with the lowest SCE.
    3. Meta-split (the remaining epochs): a copy of the model is trained for `meta_epochs`
       (1) on the whole poisoned set with cross-entropy (Adam, lr `meta_lr` 0.015, on the
       deeper half of the model: ResNet-18's layer3, layer4 and head as in the paper's
       code); the clean pool is the `epsilon` of samples whose SCE fell least. Poisoned
       samples are learned fastest, so their loss falls most; clean hard samples join.
       Stages 2 and 3 are class-blind, as in the paper: a class learned late can stay out
       of the labelled pool and lose accuracy (docs/defenses_training.md, WaNet).

    All defaults are the paper's code (config/baseline_asd.yaml). MixMatch trains with
    Adam at `lr` 0.002 without schedule, as the paper (`lr: null`: the run's optimizer,
    lr and schedule instead, which cost 2.6 more points of clean accuracy on MNIST), in
    batches of the run's batch size (the paper: 64) for `iterations` steps per epoch
    (default: one pass of the training set; the paper: 1024 of 64, 1.3 passes of
    CIFAR-10), T `temperature` 0.5, `alpha` 0.75, `lambda_u` 15 ramped up over the run;
    unlabelled views use the run's augmentation, or random shifts where the task has
    none. Uses the poisoned training set, the run's budget (epochs, batch size,
    augmentation) and, for the seeds only, the clean budget. Returns the model, the last
    split's criterion as suspicion score and the last polluted pool as flagged.
    """

    def __init__(self, class_aware_epochs: int | None = None,
                 class_agnostic_epochs: int | None = None, seed_num: int = 10,
                 growth: int = 10, epsilon: float = 0.5, meta_epochs: int = 1,
                 meta_lr: float = 0.015, lr: float | None = 0.002,
                 iterations: int | None = None, temperature: float = 0.5, alpha: float = 0.75,
                 lambda_u: float = 15.0, **base: Any) -> None:
        super().__init__(**base)
        for key, value in (("class_aware_epochs", class_aware_epochs),
                           ("class_agnostic_epochs", class_agnostic_epochs),
                           ("iterations", iterations)):
            if value is not None and value < (1 if key == "iterations" else 0):
                raise ValueError(f"{key} must be >= {1 if key == 'iterations' else 0}, "
                                 f"got {value}")
        if seed_num < 1 or growth < 0 or meta_epochs < 1:
            raise ValueError("seed_num and meta_epochs must be >= 1, growth >= 0")
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        if min(meta_lr, temperature, alpha, 1.0 if lr is None else lr) <= 0 or lambda_u < 0:
            raise ValueError("meta_lr, lr, temperature and alpha must be > 0, lambda_u >= 0")
        self.class_aware_epochs, self.class_agnostic_epochs = class_aware_epochs, \
            class_agnostic_epochs
        self.seed_num, self.growth, self.epsilon = seed_num, growth, epsilon
        self.meta_epochs, self.meta_lr, self.iterations = meta_epochs, meta_lr, iterations
        self.lr = lr
        self.mixmatch = {"temperature": temperature, "alpha": alpha, "lambda_u": lambda_u}

    def stages(self, epochs: int) -> tuple[int, int, int]:
        """Epochs of the class-aware, class-agnostic and meta-split stages."""
        first = self.class_aware_epochs
        first = min(epochs, max(1, int(CLASS_AWARE_SHARE * epochs + 0.5)) if first is None
                    else first)
        second = self.class_agnostic_epochs
        second = min(epochs - first, int(CLASS_AGNOSTIC_SHARE * epochs + 0.5) if second is None
                     else second)
        return first, second, epochs - first - second

    def train(self, model: nn.Module, data: DefenseData, budget: TrainingBudget) -> Trained:
        if not isinstance(data.train, ArrayDataset):
            raise DataError("asd needs an in-memory training set")
        train, tc = data.train, budget.train
        epochs = training_epochs(budget)
        first, second, third = self.stages(epochs)
        seeds = seed_pool(data.clean, self.seed_num, data.num_classes, data.generator)
        optimizer, scheduler = semi_optimizer(model, budget, self.lr)
        semi = MixMatch(data.num_classes, tc.batch_size,
                        self.iterations or -(-len(train) // tc.batch_size), epochs,
                        budget.augment or default_view(data.input_shape), data, **self.mixmatch)
        curve = []
        for what, span in (("class-aware split", range(first)),
                           ("class-agnostic split", range(first, first + second)),
                           ("meta-split", range(first + second, epochs))):
            for epoch in data.progress.phase(span, f"{what} + MixMatch epochs"):
                scores, pool, stage = self._split(model, data, budget, epoch, first, second)
                self.keep_pool(stage, pool)
                labelled = train.subset(pool)
                if stage == "class_aware":
                    labelled = concat(seeds, labelled)
                curve.append(semi.epoch(model, optimizer, labelled, train.subset(~pool), epoch))
                if scheduler is not None:
                    scheduler.step()
        return Trained(model=model.eval(), scores=scores, flagged=~pool, figures={
            "stage_epochs": [first, second, third], "seeds": len(seeds),
            "labelled_pool": int(pool.sum()), "final_loss": curve[-1]["loss"]},
            artifacts={name: torch.tensor([c[key] for c in curve])
                       for name, key in (("mixmatch_loss_curve", "loss"),
                                         ("labelled_loss_curve", "lx"),
                                         ("unlabelled_loss_curve", "lu"))})

    def _split(self, model: nn.Module, data: DefenseData, budget: TrainingBudget, epoch: int,
               first: int, second: int) -> tuple[Tensor, Tensor, str]:
        """(suspicion per sample, clean pool mask, stage name) at the start of `epoch`."""
        assert isinstance(data.train, ArrayDataset)
        losses = sample_sce(model, data.train, data)
        if epoch < first:
            per_class = class_quota(epoch, first, self.growth)
            rank = class_rank(losses, data.train.labels, data.num_classes)
            return losses, rank < per_class, "class_aware"
        if epoch < first + second:
            return losses, lowest(losses, self.epsilon), "class_agnostic"
        after = sample_sce(self._virtual(model, data, budget), data.train, data)
        return *meta_split(losses, after, self.epsilon), "meta"

    def _virtual(self, model: nn.Module, data: DefenseData, budget: TrainingBudget
                 ) -> nn.Module:
        """A copy of the model after `meta_epochs` of plain supervised training on the
        poisoned set (its deeper half, Adam at `meta_lr`): what one more epoch of
        ordinary training would do to each sample's loss."""
        assert data.train is not None
        virtual = copy.deepcopy(model).train()
        optimizer = torch.optim.Adam(deep_parameters(virtual), lr=self.meta_lr)
        forward = Accelerated(virtual, data.device, data.precision)
        scaler = LossScaler(data.precision, data.device)
        loader = Loader(data.train, budget.train.batch_size, data.device, shuffle=True,
                        generator=data.generator, augment=budget.augment)
        for _ in data.progress.phase(range(self.meta_epochs), "training the virtual model"):
            for batch in loader:
                loss = F.cross_entropy(forward(batch.inputs), batch.labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.backward(loss)
                scaler.step(optimizer)
        return virtual.eval()
