"""Aggregation rules for federated learning, as pure functions over client updates.

Every function takes `updates` as a [K, P] tensor (one flattened model delta per client)
and returns the aggregate delta [P] (and, where the rule decides per client, which clients
it kept or how it weighted them). The classes in `aggregators.py` are thin adapters.
"""

from __future__ import annotations

import torch
from torch import Tensor


def original_sum(updates: Tensor, eta: float, total_participants: int) -> Tensor:
    """Backdoors 101 / "How To Backdoor Federated Learning" (arXiv 1807.00459):
    global += eta / N * sum of the sampled clients' updates, N the population size."""
    return updates.sum(0) * (eta / total_participants)


def mean(updates: Tensor, weights: Tensor | None = None) -> Tensor:
    """FedAvg (McMahan et al., arXiv 1602.05629): the (weighted) mean update."""
    if weights is None:
        return updates.mean(0)
    w = weights.to(updates.dtype)
    return (w[:, None] * updates).sum(0) / w.sum().clamp(min=1e-12)


def accepted_mean(updates: Tensor, samples: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """FedAvg of the kept updates, weighted by their sample counts (uniformly where the
    kept ones trained on none); zero when none is kept. Returns (mean, coefficients)."""
    weights = samples.to(updates.device, updates.dtype) * keep
    if float(weights.sum()) == 0:
        weights = keep.to(updates.dtype)
    coef = weights / weights.sum().clamp(min=1e-12)
    return (coef[:, None] * updates).sum(0), coef


def clip_norms(updates: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Scale each update down to L2 norm <= bound (Sun et al., "Can You Really Backdoor
    Federated Learning?", arXiv 1911.07963). Returns (clipped, scale factors)."""
    norms = updates.norm(dim=1)
    scale = (bound / norms.clamp(min=1e-12)).clamp(max=1.0)
    return updates * scale[:, None], scale


def median(updates: Tensor) -> Tensor:
    """Coordinate-wise median (Yin et al., arXiv 1803.01498); for even K the mean of the
    two middle values, so the result does not depend on client order."""
    k = updates.shape[0]
    s = updates.sort(0).values
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


def trimmed_mean(updates: Tensor, beta: float) -> Tensor:
    """Coordinate-wise beta-trimmed mean (Yin et al., arXiv 1803.01498): drop the
    floor(beta * K) largest and smallest values of each coordinate, average the rest."""
    k = updates.shape[0]
    cut = int(beta * k)
    if 2 * cut >= k:
        raise ValueError(f"trimming {cut} from each end leaves nothing of {k} updates")
    return updates.sort(0).values[cut : k - cut].mean(0)


def krum_scores(updates: Tensor, byzantine: int) -> Tensor:
    """Krum score per client (Blanchard et al., NeurIPS 2017, arXiv 1703.02757): the sum of
    squared distances to its K - f - 2 nearest other updates."""
    k = updates.shape[0]
    neighbours = k - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs K > f + 2 (K={k}, f={byzantine})")
    d = torch.cdist(updates.double(), updates.double()).pow(2)
    d.fill_diagonal_(float("inf"))
    return d.sort(1).values[:, :neighbours].sum(1)


def multi_krum(updates: Tensor, byzantine: int, keep: int = 1) -> tuple[Tensor, Tensor]:
    """Average the `keep` updates with the lowest Krum scores (keep=1: Krum itself).
    Returns (aggregate, kept indices)."""
    chosen = krum_scores(updates, byzantine).argsort()[:keep]
    return updates[chosen].mean(0), chosen.sort().values


def cosine_distances(updates: Tensor) -> Tensor:
    unit = updates.double() / updates.double().norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (1 - unit @ unit.T).clamp(min=0)


def hdbscan_labels(distances: Tensor, min_cluster_size: int) -> Tensor:
    """HDBSCAN cluster labels (-1: noise) of a precomputed [K, K] distance matrix, with
    min_samples 1 and a single cluster allowed (FLAME's and DeepSight's setting)."""
    from sklearn.cluster import HDBSCAN

    labels = HDBSCAN(min_cluster_size=max(2, min_cluster_size), min_samples=1,
                     metric="precomputed", copy=True, allow_single_cluster=True
                     ).fit_predict(distances.double().cpu().numpy())
    return torch.as_tensor(labels, dtype=torch.long)


def flame(
    updates: Tensor, noise_factor: float = 0.001, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """FLAME (Nguyen et al., USENIX Security 2022, arXiv 2101.02281).

    1) HDBSCAN on pairwise cosine distances with min cluster size K/2 + 1 keeps the
    majority cluster (outliers are dropped); 2) kept updates are clipped to the median
    norm of all updates; 3) Gaussian noise with std noise_factor * that norm is added to
    their mean. Returns (aggregate, kept indices).
    """
    k = updates.shape[0]
    labels_t = hdbscan_labels(cosine_distances(updates), k // 2 + 1).to(updates.device)
    if bool((labels_t >= 0).any()):
        majority = labels_t[labels_t >= 0].mode().values
        kept = (labels_t == majority).nonzero().flatten()
    else:  # no cluster found: keep everyone rather than nobody
        kept = torch.arange(k, device=updates.device)
    bound = float(updates.norm(dim=1).median())
    clipped, _ = clip_norms(updates[kept], bound)
    noise = torch.randn(updates.shape[1], generator=generator, dtype=updates.dtype)
    return clipped.mean(0) + noise_factor * bound * noise.to(updates.device), kept


def foolsgold_weights(history: Tensor, confidence: float = 1.0) -> Tensor:
    """FoolsGold (Fung et al., arXiv 1808.04866): weights in [0, 1] per client from the
    cosine similarity of their accumulated historical updates; sybils pushing the same
    direction get weights near 0.

    history: [K, P] sum of each client's past updates. Follows the paper's steps:
    max similarity per client, pardoning, 1 - max, rescale by the max, logit with
    `confidence` (kappa), clipped to [0, 1].
    """
    k = history.shape[0]
    cs = 1 - cosine_distances(history)
    cs.fill_diagonal_(0)
    v = cs.max(1).values
    # Pardoning: a client less similar to others than they are to it is not penalised.
    ratio = v[:, None] / v[None, :].clamp(min=1e-12)
    cs = torch.where(v[:, None] < v[None, :], cs * ratio, cs)
    w = (1 - cs.max(1).values).clamp(0, 1)
    w = w / w.max().clamp(min=1e-12)
    w = torch.where(w == 1, torch.full_like(w, 0.99), w)
    w = confidence * (torch.log(w / (1 - w)) + 0.5)
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    return w.clamp(0, 1) if k > 1 else torch.ones(1, dtype=w.dtype)


def add_gaussian_noise(aggregate: Tensor, std: float, generator: torch.Generator | None = None
                       ) -> Tensor:
    """Weak differential privacy: Gaussian noise on the aggregate (arXiv 1911.07963)."""
    noise = torch.randn(aggregate.shape, generator=generator, dtype=aggregate.dtype)
    return aggregate + std * noise.to(aggregate.device)
