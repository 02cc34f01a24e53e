"""Symmetric cross-entropy: the loss ASD and DBD split the training set by.

Wang, Ma, Chen, Luo, Yi, Bailey, "Symmetric Cross Entropy for Robust Learning with Noisy
Labels", ICCV 2019 (arXiv 1908.06112). SCE = alpha * CE + beta * RCE, where the reverse
cross-entropy RCE = -sum_k p_k log q_k swaps the prediction p and the one-hot label q,
with log 0 taken as log 1e-4 = -9.2, as the SCE code and ASD's and DBD's do (the SCE
paper's text names A = -4). RCE is then about -log(1e-4) * (1 - p_y): bounded,
so a few confidently mislabelled samples (poison whose label disagrees with what the
image shows) stand out with a high loss without dominating a training batch. Both
papers use alpha 0.1, beta 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.dataset import Dataset
from backdoors.defenses.base import DefenseData
from backdoors.defenses.training import predict

LOG_ZERO = math.log(1e-4)  # what log 0 becomes in the reverse cross-entropy
PROB_FLOOR = 1e-7  # softmax outputs are clamped here, as in the papers' code


def symmetric_cross_entropy(logits: Tensor, labels: Tensor, alpha: float = 0.1,
                            beta: float = 1.0, reduction: str = "mean") -> Tensor:
    """alpha * CE(logits, labels) + beta * RCE(logits, labels); `reduction` is "mean" or
    "none" (one value per row)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = logits.softmax(1).clamp(min=PROB_FLOOR, max=1.0)
    log_q = torch.full_like(p, LOG_ZERO).scatter_(1, labels[:, None], 0.0)
    rce = -(p * log_q).sum(1)
    loss = alpha * ce + beta * rce
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


@torch.no_grad()
def sample_sce(model: nn.Module, dataset: Dataset, data: DefenseData, alpha: float = 0.1,
               beta: float = 1.0) -> Tensor:
    """SCE of every sample of `dataset` under `model` (eval mode, no augmentation), in
    dataset order, on the CPU."""
    logits, labels = predict(model, dataset, data)
    return symmetric_cross_entropy(logits, labels, alpha, beta, reduction="none")
