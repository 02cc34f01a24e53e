"""FLTrust (Cao et al., "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021, arXiv 2012.13995).

The server trains on its own small clean root dataset to get a server update g0, and
trusts each client by how well its update points the same way: TS_i = ReLU(cos(g_i, g0)).
Each client update is rescaled to the norm of g0 (so a boosted update weighs like any
other), and the aggregate is sum_i TS_i * g_i_hat / sum_i TS_i.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext


def fltrust(updates: Tensor, server_update: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FLTrust's aggregate of [K, P] `updates` given the server's update g0 [P].

    Returns (aggregate, trust scores TS_i, coefficients): coefficients[i] is update i's
    weight in the aggregate, TS_i * ||g0|| / ||g_i|| / sum TS. The aggregate is zero when
    every trust score is zero (no client agrees with the server)."""
    u, g0 = updates.double(), server_update.double().to(updates.device)
    g0_norm = g0.norm()
    norms = u.norm(dim=1).clamp(min=1e-12)
    cos = (u @ g0) / (norms * g0_norm.clamp(min=1e-12))
    trust = cos.clamp(min=0)
    total = trust.sum()
    if float(total) == 0:
        zero = torch.zeros_like(trust)
        return torch.zeros_like(updates[0]), trust.to(updates.dtype), zero.to(updates.dtype)
    coefficients = trust * g0_norm / norms / total
    aggregate = coefficients @ u
    return aggregate.to(updates.dtype), trust.to(updates.dtype), coefficients.to(updates.dtype)


@AGGREGATORS.register("fltrust")
class FLTrust(Aggregator):
    """FLTrust: trust clients by cosine similarity to a server update (arXiv 2012.13995).

    Cao et al., NDSS 2021. The server trains `server_epochs` (default 1, the paper's
    single local iteration setting for the server model update) at `server_lr` (default
    null: the clients' train.lr, the paper uses the clients' learning rate) on a root
    dataset of `root_samples` (default 100, the paper's) clean training rows. Trust
    TS_i = ReLU(cos(g_i, g0)), updates rescaled to ||g0||, weighted by TS_i. Flags the
    clients with TS_i = 0 (their update is ignored, not merely down-weighted)."""

    flags_clients = True
    needs_server = True

    def __init__(self, root_samples: int = 100, server_epochs: int = 1,
                 server_lr: float | None = None) -> None:
        if root_samples < 1:
            raise ValueError(f"root_samples must be >= 1, got {root_samples}")
        if server_epochs < 1:
            raise ValueError(f"server_epochs must be >= 1, got {server_epochs}")
        if server_lr is not None and server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.root_samples, self.server_epochs, self.server_lr = (root_samples, server_epochs,
                                                                 server_lr)

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        server = ctx.server
        if server is None:
            raise ValueError("fltrust needs the server's view (root data, training)")
        lr = self.server_lr if self.server_lr is not None else server.tc.lr
        g0 = server.train(server.root_data(self.root_samples), self.server_epochs, lr,
                          ctx.round)
        agg, trust, coefficients = fltrust(updates, g0)
        return Aggregate(ctx.step(agg, len(updates)), coefficients, trust == 0)
