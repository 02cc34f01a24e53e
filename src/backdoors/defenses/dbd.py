"""Decoupling-Based backdoor Defense: self-supervised backbone, linear head, semi-supervised
fine-tuning on the samples the head finds credible."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.defenses.abl import lowest
from backdoors.defenses.base import DEFENSES, DefenseData
from backdoors.defenses.results import Trained
from backdoors.defenses.sce import sample_sce, symmetric_cross_entropy
from backdoors.defenses.semi import (
    MixMatch,
    SplittingDefense,
    default_view,
    semi_optimizer,
    training_epochs,
)
from backdoors.defenses.simclr import pretrain
from backdoors.defenses.target import TrainingBudget
from backdoors.errors import DataError
from backdoors.execution import LossScaler, autocast

# The paper's schedule against a 200-epoch supervised budget: 100 SimCLR epochs, then 10
# epochs of the linear head and 190 of semi-supervised fine-tuning.
SELF_SHARE, WARMUP_SHARE = 0.5, 0.05


@DEFENSES.register("dbd")
class DecouplingDefense(SplittingDefense):
    """DBD (arXiv 2202.03423): learn features without labels, then trust only what they support.

    Huang, Li, Wu, Qin, Ren, "Backdoor Defense via Decoupling the Training Process"
    (ICLR 2022). Poisoned samples cluster in the features of a supervised model because
    their labels pull them together; without labels they stay next to their true class.

    1. Self-supervised pre-training of the backbone (everything but the head) with SimCLR
       on the training images without labels (defenses/simclr.py) for `self_epochs`:
       batch `self_batch_size` 512, SGD lr `self_lr` 0.4 (momentum 0.9, weight decay
       1e-4, cosine), NT-Xent temperature `simclr_temperature` 0.5 (the paper's code).
       Default: half the run's epochs, at least 1 (the paper: 100 epochs before a
       200-epoch budget); this phase comes on top of the victim's budget.
    2. The backbone is frozen and only the linear head is trained on the labelled,
       poisoned set with symmetric cross-entropy (alpha 0.1, beta 1) for `warmup_epochs`
       (default 5% of the run's epochs, at least 1: the paper's 10 of 200).
    3. The `epsilon` (0.5) of samples with the lowest SCE are high-credible, the rest
       low-credible: their labels are dropped.
    4. The whole model is fine-tuned with MixMatch (defenses/semi.py) for the rest of the
       run's epochs (the paper's 190), high-credible samples labelled, low-credible ones
       unlabelled; with `resplit` (default, as the paper's code does) the split is
       recomputed by SCE at the start of every fine-tuning epoch, else kept from step 3
       (as the paper's text describes).

    Steps 2 and 4 train with Adam at `lr` 0.002 without schedule, as the paper (`lr:
    null`: the run's optimizer, lr and schedule; SGD at the victim's lr lost 21 points of
    clean accuracy on MNIST: SimCLR leaves simple_net's features 250 times larger than at
    initialisation, and plain SGD steps on them overshoot), in batches of the run's
    batch size (the paper: 128 for the head, 64 for MixMatch) with its augmentation,
    `iterations` steps per fine-tuning epoch (default one pass of the training set; the
    paper: 1024), MixMatch `temperature` 0.5, `alpha` 0.75 and `lambda_u` 15 ramped up
    over the fine-tuning. Uses the poisoned training set and the run's budget (epochs,
    batch size, augmentation), not the clean budget. Returns the model, each sample's
    last SCE as suspicion score and the last low-credible set as flagged.
    """

    uses_clean_data = False

    def __init__(self, self_epochs: int | None = None, self_batch_size: int = 512,
                 self_lr: float = 0.4, simclr_temperature: float = 0.5,
                 warmup_epochs: int | None = None, epsilon: float = 0.5, resplit: bool = True,
                 lr: float | None = 0.002, iterations: int | None = None,
                 temperature: float = 0.5, alpha: float = 0.75, lambda_u: float = 15.0,
                 **base: Any) -> None:
        super().__init__(**base)
        for key, value in (("self_epochs", self_epochs), ("warmup_epochs", warmup_epochs)):
            if value is not None and value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if iterations is not None and iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if self_batch_size < 2:
            raise ValueError(f"self_batch_size must be >= 2, got {self_batch_size}")
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        if min(self_lr, simclr_temperature, temperature, alpha,
               1.0 if lr is None else lr) <= 0 or lambda_u < 0:
            raise ValueError("self_lr, simclr_temperature, lr, temperature and alpha must be "
                             "> 0, lambda_u >= 0")
        self.self_epochs, self.self_batch_size, self.self_lr = self_epochs, self_batch_size, \
            self_lr
        self.simclr_temperature, self.warmup_epochs = simclr_temperature, warmup_epochs
        self.epsilon, self.resplit, self.iterations = epsilon, resplit, iterations
        self.lr = lr
        self.mixmatch = {"temperature": temperature, "alpha": alpha, "lambda_u": lambda_u}

    def phases(self, epochs: int) -> tuple[int, int, int]:
        """Epochs of self-supervised pre-training, head warm-up and fine-tuning."""
        ssl = self.self_epochs if self.self_epochs is not None \
            else max(1, int(SELF_SHARE * epochs + 0.5))
        warmup = self.warmup_epochs if self.warmup_epochs is not None \
            else max(1, int(WARMUP_SHARE * epochs + 0.5))
        warmup = min(warmup, epochs)
        return ssl, warmup, epochs - warmup

    def train(self, model: nn.Module, data: DefenseData, budget: TrainingBudget) -> Trained:
        if not isinstance(data.train, ArrayDataset):
            raise DataError("dbd needs an in-memory training set")
        train, tc = data.train, budget.train
        ssl, warmup, finetune = self.phases(training_epochs(budget))
        ssl_curve = pretrain(model, train, data, ssl, self.self_batch_size, self.self_lr,
                             self.simclr_temperature)
        optimizer, scheduler = semi_optimizer(model, budget, self.lr)
        scaler = LossScaler(data.precision, data.device)
        head_curve = []
        for _ in data.progress.phase(range(warmup), "linear head warm-up (frozen backbone)"):
            head_curve.append(self._warmup_epoch(model, optimizer, scaler, data, budget))
            if scheduler is not None:
                scheduler.step()
        semi = MixMatch(data.num_classes, tc.batch_size,
                        self.iterations or -(-len(train) // tc.batch_size), finetune,
                        budget.augment or default_view(data.input_shape), data, **self.mixmatch)
        scores = sample_sce(model, train, data)
        pool = lowest(scores, self.epsilon)
        self.keep_pool("split", pool)
        figures = {"phase_epochs": [ssl, warmup, finetune]}
        curve = []
        for epoch in data.progress.phase(range(finetune), "MixMatch fine-tuning"):
            if self.resplit and epoch > 0:
                scores = sample_sce(model, train, data)
                pool = lowest(scores, self.epsilon)
            self.keep_pool("finetune", pool)
            curve.append(semi.epoch(model, optimizer, train.subset(pool), train.subset(~pool),
                                    epoch))
            if scheduler is not None:
                scheduler.step()
        artifacts = {"simclr_loss_curve": torch.tensor(ssl_curve),
                     "head_loss_curve": torch.tensor(head_curve),
                     "mixmatch_loss_curve": torch.tensor([c["loss"] for c in curve])}
        return Trained(model=model.eval(), scores=scores, flagged=~pool, figures=figures,
                       artifacts={k: v for k, v in artifacts.items() if len(v)})

    def _warmup_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: LossScaler, data: DefenseData, budget: TrainingBudget) -> float:
        """One epoch of the head alone on frozen backbone features (eval mode, no
        gradient), symmetric cross-entropy; returns the mean loss."""
        assert data.train is not None
        loader = Loader(data.train, budget.train.batch_size, data.device, shuffle=True,
                        generator=data.generator, augment=budget.augment)
        model.eval()
        total = 0.0
        for batch in loader:
            with autocast(data.device, data.precision):
                with torch.no_grad():
                    features = model.features(batch.inputs)
                logits = model.head(features)
            loss = symmetric_cross_entropy(logits.float(), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.backward(loss)
            scaler.step(optimizer)
            total += loss.item()
        return total / max(1, len(loader))
