"""Detection-based federated defenses: DeepSight's statistics, FLDetector's L-BFGS and gap
statistics, BackdoorIndicator's flags on a fake server, and each end to end on the tiny
synthetic task flagging a boosted attacker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support import fl, rows
from torch import Tensor, nn

from backdoors.config import from_dict
from backdoors.data.dataset import ArrayDataset
from backdoors.experiment import run
from backdoors.federated import AGGREGATORS, RoundContext
from backdoors.federated import deepsight as ds
from backdoors.federated import fldetector as fd
from backdoors.federated import indicator as bi


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- DeepSight ------------------------------------------------------------------------


def test_split_head_takes_weights_then_biases():
    c, d = 3, 2
    head = torch.arange(c * (d + 1), dtype=torch.float32)[None]
    w, b = ds.split_head(head, c)
    assert w.shape == (1, c, d) and torch.equal(w[0, 1], torch.tensor([2.0, 3.0]))
    assert torch.equal(b[0], torch.tensor([6.0, 7.0, 8.0]))
    with pytest.raises(ValueError, match="C x"):
        ds.split_head(torch.zeros(1, 10), 3)


def test_neups_and_threshold_exceedings_on_a_hand_made_head():
    # Benign: every output neuron's update has energy 1; backdoor: one neuron dominates.
    spread = torch.full((4, 2), 0.5)
    focused = torch.tensor([[1.5, 0.5], [0.05, 0.05], [0.05, 0.05], [0.05, 0.05]])
    w = torch.stack([spread, -spread, focused])
    b = torch.zeros(3, 4)
    n = ds.neups(w, b)
    assert torch.allclose(n.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(n[0], torch.full((4,), 0.25, dtype=torch.float64))
    assert n[2, 0] == pytest.approx(4 / (4 + 3 * 0.01))  # energies 2^2 and 0.1^2
    te = ds.threshold_exceedings(n, 0.1)
    assert te.tolist() == [4, 4, 1]
    # The bias counts towards its neuron's energy.
    assert ds.neups(torch.zeros(1, 2, 1), torch.tensor([[1.0, 0.0]])).tolist() == [[1.0, 0.0]]


def test_suspicious_below_half_the_median_exceedings():
    assert ds.suspicious(torch.tensor([4, 4, 4, 1, 2])).tolist() == [False] * 3 + [True,
                                                                                  False]


def test_ddifs_are_one_for_the_global_model_and_grow_with_a_class():
    g = torch.softmax(torch.randn(50, 3, generator=gen()), 1)
    assert torch.allclose(ds.ddifs(g, g), torch.ones(3, dtype=torch.float64))
    boosted = torch.softmax(g.log() + torch.tensor([2.0, 0.0, 0.0]), 1)
    d = ds.ddifs(boosted, g)
    assert d[0] > 1.5 and d[1] < 1 and d[2] < 1


def test_clusters_with_a_suspicious_share_of_tau_or_more_are_rejected():
    clusters = torch.tensor([0, 0, 0, 1, 1, -1, -1])
    labels = torch.tensor([False, False, True, True, False, False, True])
    # cluster 0: 1/3 suspicious (not below tau); cluster 1: 1/2; noise judged alone.
    assert ds.accepted(clusters, labels, 0.34).tolist() == [True] * 3 + [False] * 2 + [True,
                                                                                       False]
    assert ds.accepted(clusters, labels, 1 / 3).tolist()[:3] == [False] * 3
    dist = ds.co_cluster_distance(torch.tensor([0, 0, -1, -1]))
    assert dist.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]


def test_merged_clustering_separates_a_group_that_differs_in_every_view():
    near = torch.zeros(6, 6)
    near[:4, 4:] = near[4:, :4] = 1.0
    clusters = ds.merged_clusters(near, near, [near, near], 2)
    assert len(set(clusters[:4].tolist())) == 1 and clusters[0] != clusters[4]


def test_deepsight_rejects_options_it_cannot_use():
    for bad in ({"tau": 0}, {"probe_samples": 0}, {"xi": 1.5}, {"min_cluster_size": 1}):
        with pytest.raises(ValueError):
            AGGREGATORS.get("deepsight")(**bad)


# ---- FLDetector -----------------------------------------------------------------------


def _spd(d: int, seed: int = 0) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.5, 4.0, d, dtype=torch.float64)) @ q.T


def test_lbfgs_hvp_is_exact_on_a_quadratic_with_conjugate_pairs():
    """For f = x^T A x / 2, gradient changes are y = A s; with A-conjugate steps (here
    A's eigenvectors) spanning the space, the L-BFGS matrix is A itself."""
    a = _spd(5)
    s = torch.linalg.eigh(a).eigenvectors.T * torch.tensor([1.0, -2, 0.5, 3, 1],
                                                           dtype=torch.float64)[:, None]
    y = s @ a
    v = torch.randn(5, generator=gen(1), dtype=torch.float64)
    assert torch.allclose(fd.lbfgs_hvp(s, y, v), a @ v, atol=1e-8)
    # One pair: the secant equation B s = y holds.
    s1 = torch.randn(1, 5, generator=gen(2), dtype=torch.float64)
    assert torch.allclose(fd.lbfgs_hvp(s1, s1 @ a, s1[0]), (s1 @ a)[0], atol=1e-8)


def test_gap_statistics_find_two_clusters_only_when_there_are_two():
    g = gen(3)
    apart = torch.cat([0.1 + 0.01 * torch.randn(8, generator=g),
                       0.9 + 0.01 * torch.randn(2, generator=g)])
    one = 0.5 + 0.05 * torch.randn(10, generator=g)
    assert fd.gap_clusters(apart, gen(4)) >= 2
    assert fd.gap_clusters(one, gen(4)) == 1
    assert fd.malicious_cluster(apart).tolist() == [False] * 8 + [True] * 2
    assert fd.gap_clusters(torch.ones(5), gen(4)) == 1


def test_one_dimensional_kmeans_is_the_optimum():
    x = torch.tensor([5.0, 0.0, 1.0, 10.0, 11.0, 6.0])
    labels, sse = fd.kmeans_1d(x, 3)
    assert labels.tolist() == [1, 0, 0, 2, 2, 1] and sse == pytest.approx(1.5)
    assert fd.kmeans_1d(x, 1)[1] == pytest.approx(float((x - x.mean()).pow(2).sum()))


def _fake_round(det: Any, t: int, params: Tensor, updates: Tensor) -> Any:
    server = SimpleNamespace(global_params=params)
    ctx = RoundContext(1.0, 5, torch.arange(5), torch.full((5,), 10), gen(t), None, t,
                       server)  # type: ignore[arg-type]
    return det.aggregate(updates, ctx)


def test_fldetector_flags_the_unpredictable_client_and_resumes_exactly():
    """Honest clients follow the quadratic's gradient; client 0 sends a large random
    update every round. After the warmup it is flagged, and a detector restored from
    state_dict decides the next round exactly like the original."""
    a, g = _spd(6), gen(5)
    det = AGGREGATORS.get("fldetector")(window=3, warmup=2)
    w = torch.randn(6, generator=g, dtype=torch.float64)
    flags, copy = [], None
    for t in range(1, 7):
        updates = torch.stack([-0.1 * a @ w + 0.001 * torch.randn(6, generator=g,
                                                                   dtype=torch.float64)
                               for _ in range(5)])
        updates[0] = 2 * torch.randn(6, generator=g, dtype=torch.float64)
        if t == 6:
            copy = AGGREGATORS.get("fldetector")(window=3, warmup=2)
            copy.load_state_dict(det.state_dict())
            again = _fake_round(copy, t, w, updates.clone())
        agg = _fake_round(det, t, w, updates)
        flags.append(agg.flagged.tolist())
        w = w + agg.delta
    assert all(f == [False] * 5 for f in flags[:2])  # warmup
    assert all(f == [True] + [False] * 4 for f in flags[2:])
    assert torch.equal(again.delta, agg.delta) and torch.equal(again.flagged, agg.flagged)


# ---- BackdoorIndicator -----------------------------------------------------------------


class _Remembers(nn.Module):
    """Predicts the indicator labels while params[0] > 0.5, a wrong one otherwise."""

    def __init__(self, data: ArrayDataset) -> None:
        super().__init__()
        self.data, self.keep = data, True

    def forward(self, x: Tensor) -> Tensor:
        labels = self.data.labels[:len(x)]
        return nn.functional.one_hot(labels if self.keep else (labels + 1) % 4, 4).float()


class _FakeServer:
    num_classes, seed, device = 4, 0, torch.device("cpu")

    def __init__(self) -> None:
        g = gen(6)
        self.root = ArrayDataset(torch.randint(0, 256, (40, 1, 4, 4), generator=g,
                                               dtype=torch.uint8), torch.zeros(40,
                                                                               dtype=torch.long))
        self.global_params = torch.zeros(3)
        self.model: _Remembers | None = None

    def root_data(self, n: int) -> ArrayDataset:
        return self.root.subset(slice(0, n))

    def train(self, data: ArrayDataset, epochs: int, lr: float, round_: int) -> Tensor:
        return torch.tensor([1.0, 0.0, 0.0])  # planting switches the indicator on

    def model_with(self, params: Tensor) -> nn.Module:
        assert self.model is not None
        self.model.keep = bool(params[0] > 0.5)
        return self.model


def test_indicator_plants_then_flags_the_updates_that_keep_it():
    server = _FakeServer()
    rule = AGGREGATORS.get("indicator")(samples=40)
    server.model = _Remembers(rule.indicator_data(server))
    ctx = RoundContext(1.0, 4, torch.arange(4), torch.zeros(4, dtype=torch.long), gen(), None,
                       1, server)  # type: ignore[arg-type]
    planted = rule.before_round(ctx)
    assert planted is not None and planted.tolist() == [1.0, 0.0, 0.0]
    server.global_params = planted
    ctx.samples = torch.tensor([10, 10, 10, 30])
    updates = torch.tensor([[-1.0, 0, 0], [0.1, 1, 0], [-0.9, 0, 1], [-2.0, 0, 0]])
    agg = rule.aggregate(updates, ctx)
    assert agg.flagged.tolist() == [False, True, False, False]
    assert agg.coefficients.tolist() == pytest.approx([0.2, 0.0, 0.2, 0.6])
    # Before start_round nothing is planted and nobody is judged.
    late = AGGREGATORS.get("indicator")(start_round=5)
    assert late.before_round(ctx) is None
    assert not late.aggregate(updates, ctx).flagged.any()


def test_indicator_statistics():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    acc = bi.label_accuracies(torch.tensor([0, 0, 1, 0, 0, 0]), labels, 4)
    assert acc.tolist() == [1.0, 0.5, 0.0, 0.0]
    assert bi.keeps_indicator(torch.stack([acc, acc / 2]), 0.85).tolist() == [True, False]
    images = torch.randint(0, 256, (5, 1, 3, 3), generator=gen(7), dtype=torch.uint8)
    assert torch.equal(bi.out_of_distribution(images, 0.0, gen()), 255 - images)
    spread = bi.indicator_labels(20, 4, gen())
    assert torch.bincount(spread).tolist() == [5] * 4


# ---- end to end ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), [
    ("deepsight", {"probe_samples": 200, "seeds": 2}),
    ("fldetector", {"window": 2, "warmup": 1}),
    ("indicator", {}),
])
def test_detector_flags_a_boosted_attacker_end_to_end(tiny, tmp_path, one_thread, name,
                                                      options):
    """Four rounds, the one attacker forced into every round (boosted x5)."""
    cfg = fl(tiny, {"name": name, **options}, rounds=4, attack_round=None,
             attackers_per_round=1)
    summary = run(from_dict(cfg), out=tmp_path, quiet=True)
    assert summary["status"] == "completed" and summary["rounds"] == 4
    rounds = rows(summary)
    assert all(len(r["flagged"]) == 5 and r["detection"] is not None for r in rounds)
    assert any(r["detection"]["recall"] == 1.0 for r in rounds)
    assert summary["detection"]["true_positives"] >= 1
