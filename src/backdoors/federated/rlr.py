"""Robust learning rate (Ozdayi et al., "Defending against Backdoors in Federated
Learning with Robust Learning Rate", AAAI 2021, arXiv 2007.03767).

Per coordinate, the clients vote with the sign of their update: where fewer than theta
agree (|sum_i sign(u_i)| < theta) the server learning rate of that coordinate is -eta,
elsewhere +eta. A backdoor needs coordinates that honest clients do not push, and those
coordinates are the ones with weak agreement: their change is reversed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext
from backdoors.federated.aggregators import sample_weights


def rlr_signs(updates: Tensor, threshold: float) -> Tensor:
    """+1 where at least `threshold` more clients agree on a coordinate's sign than
    disagree, -1 elsewhere ([P], the updates' dtype)."""
    votes = torch.sign(updates).sum(0).abs()
    return torch.where(votes >= threshold, 1.0, -1.0).to(updates.dtype)


@AGGREGATORS.register("rlr")
class RobustLR(Aggregator):
    """RLR: flip the server learning rate where clients' signs disagree (arXiv 2007.03767).

    Ozdayi et al., AAAI 2021: the (sample-weighted, `weighted` default true, the paper's
    FedAvg) mean update times +1 on coordinates where |sum of signs| >= `threshold`, -1
    elsewhere. Default threshold 4: the paper's choice for its 10-agent Fashion-MNIST
    setting (theta between the number of corrupt agents and half the agents); set it for
    your per_round. Judges no client; reports the share of flipped coordinates as
    `rlr_flipped`."""

    def __init__(self, threshold: int = 4, weighted: bool = True) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.threshold, self.weighted = threshold, weighted
        self.flipped = 0.0

    def check(self, per_round: int) -> None:
        if self.threshold > per_round:
            raise ValueError(f"threshold {self.threshold} exceeds the {per_round} updates per "
                             "round: every coordinate would be flipped")

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        w = sample_weights(updates, ctx) if self.weighted else None
        signs = rlr_signs(updates, self.threshold)
        self.flipped = float((signs < 0).double().mean())
        return Aggregate(ctx.step(rules.mean(updates, w) * signs, len(updates)))

    def report(self, ctx: RoundContext) -> dict[str, float]:
        return {"rlr_flipped": self.flipped}
