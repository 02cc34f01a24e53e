"""Fine-Pruning: prune channels that clean inputs leave dormant, then fine-tune."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, DefenseResult, ModelRepair
from backdoors.defenses.training import accuracy, finetune, predict


class ChannelMask(nn.Module):
    """Multiplies channel c of a [N, C, ...] feature map by mask[c] (0 = pruned).

    Appending this to `model.body` prunes any model the same way, whatever its last layer
    is; the mask is a buffer, so it moves with the model and fine-tuning cannot revive a
    pruned channel.
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask.view(1, -1, *([1] * (x.dim() - 2)))


def prune(model: nn.Module, mask: Tensor) -> nn.Module:
    """Append a ChannelMask to `model.body` (in place) and return the model."""
    model.body = nn.Sequential(model.body, ChannelMask(mask.to(next(model.parameters()).device)))
    return model


@DEFENSES.register("fine_pruning")
class FinePruning(ModelRepair):
    """Fine-Pruning (arXiv 1805.12185): prune channels dormant on clean data, fine-tune.

    Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
    Neural Networks".

    Channels of the last feature map (`model.feature_map`) are ranked by their mean
    activation on the clean budget and pruned from the most dormant up, as long as the
    clean-budget accuracy stays within `max_accuracy_drop` (default 0.04, the paper's 4%)
    of the unpruned model and at most `max_ratio` (0.9) of the channels go. Then the
    pruned model is fine-tuned on the clean budget: `epochs` 10, SGD `lr` 0.01, momentum
    0.9, weight decay 5e-4, `batch_size` 64.
    """

    def __init__(
        self,
        max_accuracy_drop: float = 0.04,
        max_ratio: float = 0.9,
        epochs: int = 10,
        lr: float = 0.01,
        batch_size: int = 64,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if not 0.0 <= max_accuracy_drop <= 1.0 or not 0.0 <= max_ratio < 1.0:
            raise ValueError("max_accuracy_drop must be in [0, 1] and max_ratio in [0, 1)")
        if epochs < 0 or lr <= 0 or batch_size < 1:
            raise ValueError("epochs must be >= 0, lr > 0 and batch_size >= 1")
        self.max_accuracy_drop, self.max_ratio = max_accuracy_drop, max_ratio
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def choose_mask(self, model: nn.Module, data: DefenseData) -> Tensor:
        """1 for kept channels, 0 for pruned ones (on the CPU)."""
        # The mask sits after the body, so the clean feature maps are computed once and
        # each candidate mask costs only pool + head: every prefix of the ranking is tried,
        # as in the paper, even for 512-channel models.
        model.eval()
        fmap, labels = predict(model, data.clean, data, model.feature_map)
        order = fmap.transpose(0, 1).flatten(1).mean(1).argsort()  # most dormant first
        mask = torch.ones(fmap.shape[1])
        base_acc = _masked_accuracy(model, fmap, labels, mask, data)
        for c in order[: int(self.max_ratio * len(order))].tolist():
            mask[c] = 0.0
            drop = base_acc - _masked_accuracy(model, fmap, labels, mask, data)
            if drop > self.max_accuracy_drop:
                mask[c] = 1.0
                break
        return mask

    def repair(self, model: nn.Module, data: DefenseData) -> tuple[nn.Module, DefenseResult]:
        model = copy.deepcopy(model)
        mask = self.choose_mask(model, data)
        prune(model, mask)
        pruned_acc = accuracy(model, data.clean, data)
        finetune(model, data.clean, data, self.epochs, self.lr, batch_size=self.batch_size)
        return model, DefenseResult(figures={
            "pruned_ratio": float((mask == 0).double().mean()),
            "pruned_channels": int((mask == 0).sum()),
            "clean_budget_accuracy_pruned": pruned_acc,
            "clean_budget_accuracy_after": accuracy(model, data.clean, data),
        })


@torch.no_grad()
def _masked_accuracy(model: nn.Module, fmap: Tensor, labels: Tensor, mask: Tensor,
                     data: DefenseData) -> float:
    correct = 0
    for start in range(0, len(fmap), data.batch_size):
        f = fmap[start : start + data.batch_size].to(data.device)
        f = ChannelMask(mask.to(data.device))(f)
        pred = model.head(model.pool(f)).argmax(1).cpu()
        correct += int((pred == labels[start : start + data.batch_size]).sum())
    return correct / max(len(labels), 1)
