"""Averaging aggregators: the mean (Backdoors 101's and FedAvg's) and its coordinate-wise
robust variants (median, trimmed mean), thin registered adapters around the pure rules in
`aggregation.py` (norm clipping and weak DP wrap any of them: wrappers.py). The server
step is the Backdoors 101 one (arXiv 1807.00459), see aggregator.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext


def _uniform(like: Tensor) -> Tensor:
    """1/K for each of the K rows of `like`, on its device."""
    return torch.full((len(like),), 1.0 / len(like), dtype=like.dtype, device=like.device)


def sample_weights(updates: Tensor, ctx: RoundContext) -> Tensor | None:
    """Each update's share of the round's local samples (FedAvg's weights); None when no
    client trained on any sample."""
    total = float(ctx.samples.sum())
    return None if total == 0 else ctx.samples.to(updates.device, updates.dtype) / total


@AGGREGATORS.register("original")
class Original(Aggregator):
    """Backdoors 101's rule: global += eta / N * sum of the updates (arXiv 1807.00459).

    "How To Backdoor Federated Learning" (Bagdasaryan et al.); no defense."""

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        delta = rules.original_sum(updates, ctx.eta, ctx.participants)
        return Aggregate(delta, _uniform(updates))


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator):
    """FedAvg: the sample-weighted mean update (McMahan et al., arXiv 1602.05629).

    Weighted by local sample counts (`weighted: true`, default) or plain (`false`, the same
    as `original`), through the server step. No defense."""

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        w = sample_weights(updates, ctx) if self.weighted else None
        if w is None:
            return Aggregate(ctx.step(rules.mean(updates), k), _uniform(updates))
        return Aggregate(ctx.step(rules.mean(updates, w), k), w)


@AGGREGATORS.register("median")
class Median(Aggregator):
    """Coordinate-wise median (Yin et al., arXiv 1803.01498).

    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"."""

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        return Aggregate(ctx.step(rules.median(updates), len(updates)))


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., arXiv 1803.01498).

    Drops the floor(beta * K) largest and smallest values of each coordinate (default
    beta 0.1) and averages the rest."""

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def check(self, per_round: int) -> None:
        if 2 * int(self.beta * per_round) >= per_round:
            raise ValueError(f"beta {self.beta} trims all of {per_round} updates")

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        return Aggregate(ctx.step(rules.trimmed_mean(updates, self.beta), len(updates)))
