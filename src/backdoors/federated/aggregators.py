"""Averaging aggregators: the mean (Backdoors 101's and FedAvg's) and its robust variants
(norm clipping, weak DP, coordinate-wise median and trimmed mean), thin registered
adapters around the pure rules in `aggregation.py`. The server step is the Backdoors 101
one (arXiv 1807.00459), see aggregator.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext


def _uniform(like: Tensor) -> Tensor:
    """1/K for each of the K rows of `like`, on its device."""
    return torch.full((len(like),), 1.0 / len(like), dtype=like.dtype, device=like.device)


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
        if not self.weighted or float(ctx.samples.sum()) == 0:
            w = _uniform(updates)
        else:
            w = ctx.samples.to(updates.device, updates.dtype) / float(ctx.samples.sum())
        return Aggregate(ctx.step(rules.mean(updates, w), k), w)


def _bound(updates: Tensor, bound: float | None) -> float:
    """A fixed norm bound, or (None) the median norm of this round's updates."""
    return float(updates.norm(dim=1).median()) if bound is None else bound


@AGGREGATORS.register("norm_clipping")
class NormClipping(Aggregator):
    """Norm clipping: bound each update's L2 norm, then average (arXiv 1911.07963).

    Sun et al., "Can You Really Backdoor Federated Learning?": every update is scaled down
    to L2 norm <= `bound`; `bound` null (default) uses the median norm of the round's
    updates. Flags clipped updates."""

    flags_clients = True

    def __init__(self, bound: float | None = None) -> None:
        if bound is not None and bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self.bound = bound

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        clipped, scale = rules.clip_norms(updates, _bound(updates, self.bound))
        return Aggregate(ctx.step(clipped.mean(0), k), scale / k, scale < 1)


@AGGREGATORS.register("weak_dp")
class WeakDP(Aggregator):
    """Weak DP: clip each update, average, add Gaussian noise (arXiv 1911.07963).

    Sun et al.; Backdoors 101's fl_diff_privacy. Each update is clipped to `clip` (null:
    the round's median norm), the server step applied, then Gaussian noise of std `noise`
    (default 0.001) added to every coordinate. Flags clipped updates."""

    flags_clients = True

    def __init__(self, clip: float | None = None, noise: float = 0.001) -> None:
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.clip, self.noise = clip, noise

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        clipped, scale = rules.clip_norms(updates, _bound(updates, self.clip))
        noisy = rules.add_gaussian_noise(ctx.step(clipped.mean(0), k), self.noise,
                                         ctx.generator)
        return Aggregate(noisy, scale / k, scale < 1)


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
