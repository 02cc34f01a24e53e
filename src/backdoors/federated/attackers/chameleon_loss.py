"""Chameleon's contrastive loss (arXiv 2304.12961): supervised contrastive learning in which
poisoned images are pulled toward their interferers and pushed from their facilitators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chameleon_loss(features: Tensor, labels: Tensor, origin: Tensor, poisoned: Tensor,
                   temperature: float, facilitator_weight: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al., arXiv 2004.11362) of a batch of
    penultimate `features` [N, D] with (backdoor) `labels` [N].

    Anchor i's positives are the other rows with its label: for a poisoned image, the
    other poisoned images and its interferers (benign images of the target class). Its
    contrast set is every other row; a poisoned anchor's facilitators (benign rows of its
    `origin` class, the class it came from) count `facilitator_weight` times in the
    denominator, so the loss pushes poisoned images away from them harder than from the
    rest (Dai & Li, ICML 2023, Section 4). Anchors without positives are skipped.
    """
    z = F.normalize(features, dim=1)
    sim = z @ z.T / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()  # exp() stays finite
    n = len(z)
    self_pair = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_pair
    facilitators = poisoned[:, None] & ~poisoned[None, :] & (labels[None, :] == origin[:, None])
    weights = torch.ones_like(sim)
    weights[facilitators] = facilitator_weight
    weights[self_pair] = 0.0
    log_prob = sim - torch.log((weights * sim.exp()).sum(1, keepdim=True))
    count = positives.sum(1)
    anchors = count > 0
    if not bool(anchors.any()):
        return sim.sum() * 0.0
    per_anchor = (log_prob * positives).sum(1)[anchors] / count[anchors]
    return -per_anchor.mean()
