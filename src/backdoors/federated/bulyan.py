"""Bulyan (El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML 2018, arXiv 1802.07927).

Two stages against f Byzantine updates out of K (K >= 4f + 3): Krum applied recursively
selects theta = K - 2f updates (the lowest Krum score among those left, removed one at a
time); then, per coordinate, the beta = theta - 2f selected values closest to their median
are averaged. Krum bounds how far a selected update can be; the trimmed step bounds each
coordinate, which Krum alone leaves to one update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext


def bulyan_select(updates: Tensor, byzantine: int) -> Tensor:
    """Indices (sorted) of the theta = K - 2f updates recursive Krum selects. Each pick
    scores the updates left with f Byzantine (reduced to keep one neighbour once fewer
    than f + 3 are left, which happens only in the last picks); of two left the first."""
    k = updates.shape[0]
    left = list(range(k))
    chosen: list[int] = []
    for _ in range(k - 2 * byzantine):
        if len(left) <= 2:
            pick = left[0]
        else:
            scores = rules.krum_scores(updates[left], min(byzantine, len(left) - 3))
            pick = left[int(scores.argmin())]
        chosen.append(pick)
        left.remove(pick)
    return torch.tensor(sorted(chosen), device=updates.device)


def closest_to_median_mean(selected: Tensor, beta: int) -> Tensor:
    """Per coordinate, the mean of the `beta` values closest to the coordinate's median."""
    distance = (selected - rules.median(selected)).abs()
    nearest = distance.argsort(dim=0, stable=True)[:beta]
    return selected.gather(0, nearest).mean(0)


def bulyan(updates: Tensor, byzantine: int) -> tuple[Tensor, Tensor]:
    """Bulyan's aggregate of [K, P] updates and the indices recursive Krum selected."""
    chosen = bulyan_select(updates, byzantine)
    theta = len(chosen)
    return closest_to_median_mean(updates[chosen], theta - 2 * byzantine), chosen


@AGGREGATORS.register("bulyan")
class Bulyan(Aggregator):
    """Bulyan: recursive Krum, then a coordinate-wise trimmed mean (arXiv 1802.07927).

    El Mhamdi et al., ICML 2018: selects theta = K - 2f updates by Krum applied
    recursively, then averages per coordinate the beta = theta - 2f values closest to the
    median; f = `byzantine` (default 1, so K >= 7). Needs K >= 4f + 3. Flags the updates
    recursive Krum did not select."""

    flags_clients = True

    def __init__(self, byzantine: int = 1) -> None:
        if byzantine < 0:
            raise ValueError(f"byzantine must be >= 0, got {byzantine}")
        self.byzantine = byzantine

    def check(self, per_round: int) -> None:
        if per_round < 4 * self.byzantine + 3:
            raise ValueError(f"Bulyan needs per_round >= 4 * byzantine + 3 = "
                             f"{4 * self.byzantine + 3}, got {per_round}")

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        agg, chosen = bulyan(updates, self.byzantine)
        flagged = torch.ones(k, dtype=torch.bool, device=updates.device)
        flagged[chosen] = False
        return Aggregate(ctx.step(agg, k), None, flagged)
