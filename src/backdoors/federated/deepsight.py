"""DeepSight (Rieger et al., "DeepSight: Mitigating Backdoor Attacks in Federated Learning
Through Deep Model Inspection", NDSS 2022, arXiv 2201.00763).

Each update is inspected three ways: DDifs (how the local model's softmax outputs on random
inputs divide the global model's), NEUPs (the normalised energy of the output layer's
update per output neuron) and the cosine distances of the output layer's bias updates.
NEUPs also give each model a label: a model whose update concentrates on few output
neurons (few Threshold Exceedings) is suspicious, as backdoor training pushes one target
class. The three views are clustered with HDBSCAN and merged; a cluster is accepted when
fewer than tau of its models are suspicious; accepted updates are clipped to the median
norm and averaged.

The output layer is the model's `head` (nn.Linear D -> C): its entries in a flattened
update are C x D weights then C biases (`RoundContext.head`), so D = len(head) / C - 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext
from backdoors.seeds import SERVER_PROBE, stream


def split_head(head_updates: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """[K, C * (D + 1)] head updates -> weights [K, C, D] and biases [K, C]."""
    k, n = head_updates.shape
    if n % num_classes:
        raise ValueError(f"a head of {n} entries is not C x (D + 1) with C={num_classes}")
    weights = head_updates[:, : n - num_classes].reshape(k, num_classes, -1)
    return weights, head_updates[:, n - num_classes:]


def neups(weights: Tensor, biases: Tensor) -> Tensor:
    """Normalised energy updates [K, C]: per output neuron the update energy
    |delta b| + sum |delta w| of its incoming weights, squared and normalised to sum 1."""
    energy = (biases.abs() + weights.abs().sum(2)).double().pow(2)
    return energy / energy.sum(1, keepdim=True).clamp(min=1e-30)


def threshold_exceedings(neup: Tensor, xi: float) -> Tensor:
    """Per model, the number of NEUPs above xi x its largest NEUP."""
    return (neup > xi * neup.max(1, keepdim=True).values).sum(1)


def suspicious(exceedings: Tensor) -> Tensor:
    """The paper's labels: a model is suspicious when its threshold exceedings are below
    the classification boundary, half the median over the round's models."""
    boundary = exceedings.double().median() / 2
    return exceedings.double() < boundary


def ddifs(local_probs: Tensor, global_probs: Tensor) -> Tensor:
    """Division differences [C]: the mean over probe inputs of the local model's softmax
    output divided by the global model's, per class. Probs: [n, C]."""
    return (local_probs.double() / global_probs.double().clamp(min=1e-30)).mean(0)


def co_cluster_distance(labels: Tensor) -> Tensor:
    """[K, K]: 0 for two models in the same cluster, 1 otherwise (a noise point, -1, is
    a cluster of its own)."""
    k = len(labels)
    own = torch.where(labels >= 0, labels, -1 - torch.arange(k))  # noise: unique ids
    return (own[:, None] != own[None, :]).double()


def merged_clusters(cosine: Tensor, neup: Tensor, ddif: list[Tensor],
                    min_cluster_size: int) -> Tensor:
    """DeepSight's merged clustering of K models from three [K, K] distance matrices (bias
    cosine distances, NEUP distances, DDif distances per seed): HDBSCAN on each, the
    co-cluster distances averaged (DDifs over seeds first, so each view weighs a third)
    and the ensemble distance clustered again."""
    def co(dist: Tensor) -> Tensor:
        return co_cluster_distance(rules.hdbscan_labels(dist, min_cluster_size))

    ddif_dist = torch.stack([co(d) for d in ddif]).mean(0)
    ensemble = (co(cosine) + co(neup) + ddif_dist) / 3
    return rules.hdbscan_labels(ensemble, min_cluster_size)


def accepted(clusters: Tensor, labels: Tensor, tau: float) -> Tensor:
    """Models in clusters whose share of suspicious labels is below tau; a noise point
    is judged alone, by its own label."""
    out = torch.zeros(len(clusters), dtype=torch.bool)
    for c in clusters.unique().tolist():
        members = (clusters == c).nonzero().flatten()
        if c < 0:
            out[members] = ~labels[members]
        else:
            out[members] = float(labels[members].double().mean()) < tau
    return out


@torch.no_grad()
def probe_ddifs(model_of: Callable[[Tensor], nn.Module], global_params: Tensor, updates: Tensor,
                inputs: Tensor, batch: int = 512) -> Tensor:
    """DDifs [K, C] of each (global + update) against the global model on `inputs`.
    `model_of(params)` returns a module holding `params` (ServerView.model_with)."""
    def probs(params: Tensor) -> Tensor:
        model = model_of(params)
        return torch.cat([model(inputs[i:i + batch]).softmax(1)
                          for i in range(0, len(inputs), batch)])

    reference = probs(global_params)
    return torch.stack([ddifs(probs(global_params + u), reference) for u in updates])


@AGGREGATORS.register("deepsight")
class DeepSight(Aggregator):
    """DeepSight: cluster model inspections, drop suspicious clusters (arXiv 2201.00763).

    Rieger et al., NDSS 2022. `probe_samples` random uniform inputs per seed for the DDifs
    (paper 20000; default 1000 for CPU runs), `seeds` probe sets (paper 3), `tau` the
    largest accepted share of suspicious models in a cluster (paper 1/3), `xi` the
    threshold-exceedings factor of the largest NEUP (null: the paper's max(0.01, 1/C)),
    `min_cluster_size` for HDBSCAN (default 2: the smallest cluster; the paper gives no
    value). Accepted updates are clipped to the round's median norm and averaged.
    Flags the rejected updates. Needs a model with a linear `head`."""

    flags_clients = True
    needs_server = True

    def __init__(self, probe_samples: int = 1000, seeds: int = 3, tau: float = 1 / 3,
                 xi: float | None = None, min_cluster_size: int = 2) -> None:
        if probe_samples < 1 or seeds < 1:
            raise ValueError(f"probe_samples and seeds must be >= 1, got {probe_samples} "
                             f"and {seeds}")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        if xi is not None and not 0 < xi < 1:
            raise ValueError(f"xi must be in (0, 1), got {xi}")
        if min_cluster_size < 2:
            raise ValueError(f"min_cluster_size must be >= 2, got {min_cluster_size}")
        self.probe_samples, self.seeds, self.tau = probe_samples, seeds, tau
        self.xi, self.min_cluster_size = xi, min_cluster_size

    def check(self, per_round: int) -> None:
        if per_round < 3:
            raise ValueError(f"DeepSight needs at least 3 updates per round, got {per_round}")

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        server = ctx.server
        if server is None or ctx.head is None or not server.num_classes:
            raise ValueError("deepsight needs the server view and a model with a `head`")
        k, classes = len(updates), int(server.num_classes)
        weights, biases = split_head(updates[:, ctx.head], classes)
        neup = neups(weights, biases)
        xi = self.xi if self.xi is not None else max(0.01, 1 / classes)
        labels = suspicious(threshold_exceedings(neup, xi))
        ddif = []
        for seed in range(self.seeds):  # fixed probe sets, as the paper's seeds
            g = stream(server.seed, SERVER_PROBE, seed)
            inputs = torch.rand(self.probe_samples, *server.input_shape, generator=g)
            d = probe_ddifs(server.model_with, server.global_params, updates,
                            inputs.to(server.device))
            ddif.append(torch.cdist(d, d))
        clusters = merged_clusters(rules.cosine_distances(biases), torch.cdist(neup, neup),
                                   ddif, self.min_cluster_size)
        keep = accepted(clusters, labels.cpu(), self.tau).to(updates.device)
        bound = float(updates.norm(dim=1).median())
        clipped, scale = rules.clip_norms(updates, bound)
        coef = torch.where(keep, scale, torch.zeros_like(scale))
        n = int(keep.sum())
        if n == 0:
            return Aggregate(torch.zeros_like(updates[0]), coef, ~keep)
        coef = coef / n
        return Aggregate(ctx.step(clipped[keep].mean(0), k), coef, ~keep)
