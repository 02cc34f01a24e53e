"""Neural Cleanse: a backdoor target needs a much smaller trigger than any other class."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.loader import Loader
from backdoors.defenses.base import DEFENSES, DefenseData, ModelInspector
from backdoors.defenses.results import Inspection, Repaired
from backdoors.defenses.scores import anomaly_index
from backdoors.defenses.training import finetune


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """(1 - m) * x + m * p: the trigger model of Neural Cleanse (mask [.., 1, H, W] shared
    by the channels, pattern [.., C, H, W], all in [0, 1])."""
    return (1 - mask) * x + mask * pattern


def flag_small(norms: Tensor, index: Tensor, threshold: float = 2.0) -> list[int]:
    """Classes whose trigger norm is below the median with anomaly index > threshold; only
    small norms matter (a large one means the class is hard to reach, not a backdoor)."""
    small = norms.double() < norms.double().median()
    return ((index > threshold) & small).nonzero().flatten().tolist()


@dataclass(kw_only=True)
class ReversedTriggers(Inspection):
    """The inspection with the reversed trigger of every class: masks [K, 1, H, W],
    patterns [K, C, H, W]."""

    masks: Tensor
    patterns: Tensor


@DEFENSES.register("neural_cleanse")
class NeuralCleanse(ModelInspector):
    """Neural Cleanse (IEEE S&P 2019): reverse-engineer triggers, flag tiny ones, unlearn.

    Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and
    Mitigating Backdoor Attacks in Neural Networks".

    Inspection: for every class t, a mask m = tanh(a)/2 + 1/2 ([H, W]) and a pattern
    p = tanh(b)/2 + 1/2 ([C, H, W]) are optimised with Adam (`lr` 0.1, betas 0.5/0.9) on
    mini-batches of `batch_size` (32) clean-budget images to minimise
    CE(model((1 - m) x + m p), t) + lambda * |m|_1, for at most `steps` (300) steps.
    lambda starts at `init_cost` (1e-3) and adapts as in the paper's code: after `patience`
    (5) consecutive batches at an attack success >= `success_threshold` (0.99) it is
    multiplied by 1.5, after `patience` batches below it divided by 1.5 ** 1.5 (the code
    counts epochs of many batches; here a step is one batch). The smallest mask that held
    the threshold for `patience` batches in a row is kept; a class stops early after
    `early_stop` (50) steps without a 1% smaller one (0 = never). The anomaly index (MAD)
    of the mask L1 norms flags classes whose norm is below the median with index > 2.

    Repair (`repair` true): unlearning. The model is fine-tuned on the
    clean budget (`epochs` 10, SGD `unlearn_lr` 0.01, momentum 0.9, weight decay 5e-4,
    `batch_size`) where `unlearn_fraction` (0.2) of each batch carries a flagged class's
    reversed trigger but keeps its true label (paper: 1 epoch on 10% of the training set).
    With nothing flagged the model is returned unchanged.
    """

    def __init__(
        self,
        steps: int = 300,
        lr: float = 0.1,
        init_cost: float = 1e-3,
        patience: int = 5,
        success_threshold: float = 0.99,
        early_stop: int = 50,
        repair: bool = True,
        unlearn_fraction: float = 0.2,
        epochs: int = 10,
        unlearn_lr: float = 0.01,
        batch_size: int = 32,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if steps < 1 or patience < 1 or lr <= 0 or init_cost < 0 or unlearn_lr <= 0:
            raise ValueError("steps and patience must be >= 1, lr > 0, init_cost >= 0")
        if not 0.0 < success_threshold <= 1.0 or not 0.0 <= unlearn_fraction <= 1.0:
            raise ValueError("success_threshold must be in (0, 1], unlearn_fraction in [0, 1]")
        if epochs < 0 or batch_size < 1 or early_stop < 0:
            raise ValueError("epochs and early_stop must be >= 0, batch_size >= 1")
        self.steps, self.lr, self.init_cost, self.patience = steps, lr, init_cost, patience
        self.success_threshold, self.early_stop = success_threshold, early_stop
        self.repairs = repair  # unlearn the flagged triggers after inspecting
        self.unlearn_fraction, self.epochs = unlearn_fraction, epochs
        self.unlearn_lr, self.batch_size = unlearn_lr, batch_size

    def reverse(self, model: nn.Module, data: DefenseData, target: int) -> tuple[Tensor, Tensor]:
        """The smallest trigger (mask [1, H, W], pattern [C, H, W]) that sends the clean
        budget to `target`; the last one found when none reaches the success threshold."""
        c, h, w = data.input_shape
        # Random start in [0, 1] mapped to tanh space (as the paper's code), from the
        # defense generator so inspection is reproducible.
        start = torch.rand(1 + c, h, w, generator=data.generator) * 0.98 + 0.01
        raw = torch.atanh(2 * start - 1).to(data.device).requires_grad_(True)
        optimizer = torch.optim.Adam([raw], lr=self.lr, betas=(0.5, 0.9))
        cost, above, below, stalled = self.init_cost, 0, 0, 0
        best: tuple[Tensor, Tensor] | None = None
        best_norm = math.inf
        batches = _forever(data, self.batch_size)
        for _ in range(self.steps):
            x = next(batches)
            trigger = torch.tanh(raw) / 2 + 0.5
            mask, pattern = trigger[:1], trigger[1:]
            logits = model(stamp(x, mask, pattern))
            labels = torch.full((len(x),), target, device=x.device)
            norm = mask.sum()
            loss = F.cross_entropy(logits, labels) + cost * norm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            success = float((logits.argmax(1) == target).float().mean()) >= self.success_threshold
            value = float(norm.detach())
            above, below = (above + 1, 0) if success else (0, below + 1)
            stalled += 1
            # A mask counts only after `patience` successful batches in a row: one lucky
            # batch says little about the whole clean set.
            if above >= self.patience and value < best_norm:
                stalled = 0 if value < 0.99 * best_norm else stalled  # only 1% gains count
                best, best_norm = (mask.detach().clone(), pattern.detach().clone()), value
            if self.early_stop and best is not None and stalled >= self.early_stop:
                break
            if above >= self.patience:
                cost, above = cost * 1.5, 0
            elif below >= self.patience:
                cost, below = cost / 1.5**1.5, 0
        if best is None:
            trigger = (torch.tanh(raw) / 2 + 0.5).detach()
            best = (trigger[:1], trigger[1:])
        return best

    def inspect(self, model: nn.Module, data: DefenseData) -> ReversedTriggers:
        model.eval()
        frozen = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():  # only the trigger is optimised
            p.requires_grad_(False)
        try:
            found = [self.reverse(model, data, t) for t in data.progress.phase(
                range(data.num_classes), f"reversing the trigger of each class "
                f"({self.steps} steps at most)")]
        finally:
            for p, flag in zip(model.parameters(), frozen, strict=True):
                p.requires_grad_(flag)
        masks = torch.stack([m for m, _ in found]).cpu()
        patterns = torch.stack([p for _, p in found]).cpu()
        norms = masks.flatten(1).sum(1)
        index = anomaly_index(norms)
        return ReversedTriggers(
            anomaly_index=index.float(), flagged=flag_small(norms, index),
            masks=masks, patterns=patterns, figures={"mask_norms": norms.tolist()},
            artifacts={"reversed_triggers": masks * patterns, "mask_norms": norms},
        )

    def unlearn(self, model: nn.Module, data: DefenseData, found: Inspection
                ) -> Repaired | None:
        if not self.repairs:
            return None
        assert isinstance(found, ReversedTriggers)  # what this class's inspect returns
        model = copy.deepcopy(model)
        if not found.flagged:
            return Repaired(model=model, figures={"unlearned_classes": []})
        flagged = torch.tensor(found.flagged)
        masks = found.masks[flagged].to(data.device)
        patterns = found.patterns[flagged].to(data.device)

        def paste(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            # The first rows of each (shuffled) batch get a flagged class's trigger in turn;
            # labels stay true, so the model unlearns the trigger -> target shortcut.
            n = int(round(len(x) * self.unlearn_fraction))
            which = torch.arange(n, device=x.device) % len(flagged)
            x = x.clone()
            x[:n] = stamp(x[:n], masks[which], patterns[which])
            return x, y

        finetune(model, data.clean, data, self.epochs, self.unlearn_lr,
                 batch_size=self.batch_size, transform=paste)
        return Repaired(model=model, figures={"unlearned_classes": found.flagged})


def _forever(data: DefenseData, batch_size: int) -> Iterator[Tensor]:
    """Shuffled clean-budget batches, epoch after epoch."""
    loader = Loader(data.clean, batch_size, data.device, shuffle=True, generator=data.generator)
    while True:
        for batch in loader:
            yield batch.inputs
