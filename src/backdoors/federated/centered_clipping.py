"""Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine
Robust Optimization", ICML 2021, arXiv 2012.10333).

Starting from the previous round's aggregate v (the server's history), each of L
iterations moves v by the mean of the clients' differences to it, each clipped to norm
tau: v <- v + mean_i clip(u_i - v, tau). An update far from the history moves v by at
most tau / K, however large it is; updates within tau of v count in full.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext


def centered_clip(updates: Tensor, center: Tensor, tau: float, iterations: int = 1
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """`iterations` steps of centered clipping of [K, P] `updates` around `center` [P].

    Returns (v, coefficients, clipped): v = coefficients @ updates + (1 - sum of
    coefficients) * center, tracked exactly through the iterations, and which updates
    were clipped in the last one."""
    k = updates.shape[0]
    v = center.to(updates.dtype)
    coef = torch.zeros(k, dtype=updates.dtype, device=updates.device)
    clipped = torch.zeros(k, dtype=torch.bool, device=updates.device)
    for _ in range(iterations):
        diff = updates - v
        scale = (tau / diff.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
        v = v + (scale[:, None] * diff).mean(0)
        # v is affine in the updates: its weight on u_i moves by (scale_i - sum of
        # scales * old weight) / K, the rest stays on the center.
        coef = coef * (1 - scale.mean()) + scale / k
        clipped = scale < 1
    return v, coef, clipped


@AGGREGATORS.register("centered_clipping")
class CenteredClipping(Aggregator):
    """Centered clipping around the server's history (arXiv 2012.10333).

    Karimireddy et al., ICML 2021: v <- v + mean_i clip(u_i - v, tau), `iterations` L
    times (default 1, the paper's experiments), v starting from the previous round's
    aggregate (zero in the first round; kept across rounds and in checkpoints). Default
    tau 10. Flags the updates whose difference to v was clipped in the last iteration
    (they count with less than their full weight)."""

    flags_clients = True

    def __init__(self, tau: float = 10.0, iterations: int = 1) -> None:
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.tau, self.iterations = tau, iterations
        self.history: Tensor | None = None

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        center = torch.zeros_like(updates[0]) if self.history is None \
            else self.history.to(updates.device, updates.dtype)
        v, coef, clipped = centered_clip(updates, center, self.tau, self.iterations)
        self.history = v.detach().clone()
        return Aggregate(ctx.step(v, len(updates)), coef, clipped)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.history is None else {"history": self.history.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.history = state.get("history")
