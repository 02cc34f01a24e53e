"""Defense maths on hand-sized inputs: AUROC, TPR at FPR, MAD anomaly index, DER, budget."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from backdoors.data.dataset import ArrayDataset
from backdoors.defenses.runner import clean_budget
from backdoors.defenses.scores import anomaly_index, auroc, der, format_result, tpr_at_fpr


def test_auroc_known_values():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auroc(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.ones(4), torch.tensor([0, 0, 1, 1])) == 0.5  # ties count one half
    assert math.isnan(auroc(torch.ones(3), torch.zeros(3)))


def test_auroc_matches_pairwise_definition_on_random_data():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (200,), generator=g).float()
    pos = torch.rand(200, generator=g) < 0.3
    p, n = scores[pos], scores[~pos]
    pairwise = ((p[:, None] > n[None]).double() + 0.5 * (p[:, None] == n[None]).double()).mean()
    assert auroc(scores, pos) == pytest.approx(float(pairwise))


def test_tpr_at_fpr():
    scores = torch.arange(100.0)
    positive = scores >= 90
    assert tpr_at_fpr(scores, positive, 0.05) == 1.0
    # Positives hidden among the top negatives: only those above the 5% negative cut count.
    scores = torch.cat([torch.arange(100.0), torch.tensor([97.5, 50.0])])
    positive = torch.cat([torch.zeros(100, dtype=torch.bool), torch.ones(2, dtype=torch.bool)])
    assert tpr_at_fpr(scores, positive, 0.05) == 0.5


def test_anomaly_index_on_planted_norms():
    norms = torch.tensor([10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 2.0])
    index = anomaly_index(norms)
    assert index[-1] > 2 and bool((index[:-1] < 2).all())


def test_der():
    assert der(0.9, 0.9, 0.95, 0.95) == 0.5
    assert der(0.9, 0.9, 1.0, 0.0) == 1.0
    assert der(0.9, 0.4, 1.0, 1.0) == 0.25
    assert der(0.9, 0.95, 0.5, 0.6) == 0.5  # improvements in accuracy or worse ASR clip at 0


def test_clean_budget_avoids_poisoned_samples_and_is_deterministic():
    ds = ArrayDataset(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100))
    target = SimpleNamespace(clean_train=ds, poisoned=torch.arange(100) < 50, seed=3)
    a, b = clean_budget(target, 0.2), clean_budget(target, 0.2)
    assert len(a) == 20 and torch.equal(a.labels, b.labels)
    assert bool((a.labels >= 50).all())


def test_format_result_is_one_line():
    line = format_result({"defense": "x", "stage": "repair", "seconds": 1.0, "der": 0.9,
                          "before": {"clean_accuracy": 0.9, "asr": 1.0},
                          "after": {"clean_accuracy": 0.88, "asr": 0.05}})
    assert "\n" not in line and "ASR 100.00% -> 5.00%" in line


def test_format_result_shows_what_a_defense_removed():
    line = format_result({"defense": "x", "stage": "dataset", "seconds": 1.0, "auroc": 0.9,
                          "tpr_at_5_fpr": 0.5, "removed": 120, "removed_recall": 0.95,
                          "removed_precision": 0.8})
    assert "removed 120 (recall 95.00%, precision 80.00%)" in line
