"""Splitting a training set among federated participants (pure functions over labels).

IID: a random permutation cut into near-equal parts. Non-IID: the Dirichlet split of
Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification" (arXiv 1909.06335), used by "How To Backdoor Federated Learning"
(arXiv 1807.00459): for every class, the share each participant gets is drawn from
Dirichlet(alpha, ..., alpha). Small alpha gives each participant few classes; large alpha
approaches IID.

Backdoors 101's version rounded each share separately and capped it by what was left, so
the sizes did not add up (samples were dropped, late participants starved). Here each
class is cut at rounded cumulative shares, so every sample goes to exactly one participant.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def iid_split(n: int, participants: int, generator: torch.Generator) -> list[Tensor]:
    """Sorted index lists of a random permutation of range(n) cut into `participants`
    parts whose sizes differ by at most one."""
    if participants < 1:
        raise ValueError(f"participants must be >= 1, got {participants}")
    order = torch.randperm(n, generator=generator)
    return [part.sort().values for part in torch.tensor_split(order, participants)]


def dirichlet_split(
    labels: Tensor, participants: int, alpha: float, generator: torch.Generator
) -> list[Tensor]:
    """Sorted index lists, one per participant; every index of `labels` appears once.

    For each class c with n_c samples: shares p ~ Dirichlet(alpha * 1), and participant i
    gets the class's shuffled samples between round(n_c * cumsum(p)[i-1]) and
    round(n_c * cumsum(p)[i]). A participant may get no samples when alpha is small.
    """
    if participants < 1:
        raise ValueError(f"participants must be >= 1, got {participants}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    labels = labels.cpu()
    # numpy draws the Dirichlet shares (torch's sampler takes no generator); its seed comes
    # from `generator`, so the split is a function of the caller's seed alone.
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    parts: list[list[Tensor]] = [[] for _ in range(participants)]
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        shares = rng.dirichlet(np.full(participants, alpha))
        cuts = np.rint(np.cumsum(shares) * len(rows)).astype(np.int64)
        cuts[-1] = len(rows)  # floating-point cumsum may end a hair below 1
        start = 0
        for i, stop in enumerate(cuts.tolist()):
            parts[i].append(rows[start:stop])
            start = stop
    return [torch.cat(p).sort().values if p else torch.empty(0, dtype=torch.long)
            for p in parts]
