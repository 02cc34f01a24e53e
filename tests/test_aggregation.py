"""Federated aggregation rules on hand-made updates."""

from __future__ import annotations

import pytest
import torch

from backdoors.federated.aggregation import (
    clip_norms,
    flame,
    foolsgold_weights,
    krum_scores,
    mean,
    median,
    multi_krum,
    original_sum,
    trimmed_mean,
)


def honest(k: int = 8, p: int = 20, seed: int = 0) -> torch.Tensor:
    """Benign updates: a shared direction plus small client noise (as in real rounds)."""
    g = torch.Generator().manual_seed(seed)
    return torch.ones(p) + 0.1 * torch.randn(k, p, generator=g)


def test_original_sum_scales_by_eta_over_population():
    u = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(original_sum(u, eta=10, total_participants=100), torch.tensor([0.4, 0.6]))


def test_weighted_mean():
    u = torch.tensor([[0.0], [4.0]])
    assert float(mean(u)) == 2.0 and float(mean(u, torch.tensor([3.0, 1.0]))) == 1.0


def test_clipping_bounds_norms_and_keeps_small_updates():
    u = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    clipped, scale = clip_norms(u, 1.0)
    assert torch.allclose(clipped.norm(dim=1), torch.tensor([1.0, 0.5]))
    assert torch.allclose(scale, torch.tensor([0.2, 1.0]))


def test_median_and_trimmed_mean_ignore_an_outlier():
    u = torch.tensor([[1.0], [2.0], [3.0], [1000.0]])
    assert float(median(u)) == 2.5
    assert float(trimmed_mean(u, 0.25)) == 2.5
    with pytest.raises(ValueError):
        trimmed_mean(u, 0.5)


@pytest.mark.parametrize("rule", [median, lambda u: trimmed_mean(u, 0.2), mean,
                                  lambda u: multi_krum(u, 2, 3)[0]])
def test_order_invariance(rule):
    u = honest()
    perm = torch.randperm(len(u), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rule(u), rule(u[perm]), atol=1e-6)


def test_krum_chooses_a_benign_update_and_never_the_attacker():
    u = honest()
    u[0] = 50.0  # a boosted malicious update
    scores = krum_scores(u, byzantine=1)
    assert int(scores.argmin()) != 0 and int(scores.argmax()) == 0
    agg, kept = multi_krum(u, byzantine=1, keep=5)
    assert 0 not in kept.tolist() and len(kept) == 5
    assert torch.allclose(agg, u[kept].mean(0))


def test_krum_needs_enough_clients():
    with pytest.raises(ValueError):
        krum_scores(torch.zeros(3, 2), byzantine=1)


def test_flame_drops_a_differently_directed_update_and_bounds_the_norm():
    u = honest(k=10)
    u[3] = -30 * torch.ones(20)  # opposite direction, large norm
    agg, kept = flame(u, noise_factor=0.0, generator=torch.Generator().manual_seed(0))
    assert 3 not in kept.tolist() and len(kept) >= 6
    assert float(agg.norm()) <= float(u.norm(dim=1).median()) + 1e-6


def test_foolsgold_downweights_sybils():
    h = honest(k=6, seed=2) + torch.randn(6, 20, generator=torch.Generator().manual_seed(3))
    h[4] = h[5] = 5 * torch.ones(20) + 0.001 * torch.arange(20.0)  # two colluding sybils
    w = foolsgold_weights(h)
    assert bool((w[4:] < 0.1).all()) and bool((w[:4] > 0.3).all())
