"""Metrics on hand-made logits and on a fake model that reacts to the pattern trigger."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.metrics import Counts, evaluate, update_backdoor, update_clean
from backdoors.synthesizers import SYNTHESIZERS, Synthesizer

NUM_CLASSES = 10
TARGET = 8
MARGIN = 5.0  # logit of the predicted class; every other logit is 0
LOSS_RIGHT = math.log(math.exp(MARGIN) + NUM_CLASSES - 1) - MARGIN
LOSS_WRONG = math.log(math.exp(MARGIN) + NUM_CLASSES - 1)


def one_hot_logits(predictions: list[int]) -> Tensor:
    return MARGIN * F.one_hot(torch.tensor(predictions), NUM_CLASSES).float()


def test_clean_accuracy_and_loss_are_per_sample_means_over_unequal_batches() -> None:
    counts = Counts()
    # Batch 1: one wrong sample; batch 2: three right ones.
    update_clean(counts, one_hot_logits([3]), torch.tensor([4]))
    update_clean(counts, one_hot_logits([1, 2, 3]), torch.tensor([1, 2, 3]))
    result = counts.result()
    assert result["clean_accuracy"] == pytest.approx(3 / 4)  # mean of batch means: 1/2
    per_sample = (LOSS_WRONG + 3 * LOSS_RIGHT) / 4
    mean_of_means = (LOSS_WRONG + LOSS_RIGHT) / 2
    assert abs(per_sample - mean_of_means) > 1.0
    assert result["clean_loss"] == pytest.approx(per_sample)


def test_clean_loss_matches_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(7, NUM_CLASSES), torch.randint(0, NUM_CLASSES, (7,))
    counts = Counts()
    update_clean(counts, logits[:2], labels[:2])
    update_clean(counts, logits[2:], labels[2:])
    assert counts.result()["clean_loss"] == pytest.approx(float(F.cross_entropy(logits, labels)))


def test_asr_and_robust_accuracy_count_only_rows_whose_label_differs_from_the_target() -> None:
    counts = Counts()
    true = torch.tensor([8, 8, 1, 2, 3, 4])
    backdoor = torch.full((6,), TARGET)
    # Rows with true label 8 are predicted 8 but must not count for ASR or RA.
    update_backdoor(counts, one_hot_logits([8, 8, 8, 2, 3, 5]), true, backdoor)
    result = counts.result()
    assert (counts.eligible, counts.triggered) == (4, 6)
    assert result["asr"] == pytest.approx(1 / 4)
    assert result["robust_accuracy"] == pytest.approx(2 / 4)
    assert result["backdoor_accuracy"] == pytest.approx(3 / 6)
    expected_loss = (3 * LOSS_RIGHT + 3 * LOSS_WRONG) / 6
    assert result["backdoor_loss"] == pytest.approx(expected_loss)


def test_all_to_all_labels_make_every_row_eligible() -> None:
    counts = Counts()
    true = torch.tensor([0, 1, 9])
    update_backdoor(counts, one_hot_logits([1, 1, 0]), true, (true + 1) % NUM_CLASSES)
    result = counts.result()
    assert counts.eligible == 3
    assert result["asr"] == pytest.approx(2 / 3)
    assert result["robust_accuracy"] == pytest.approx(1 / 3)


def test_empty_counts_give_nan_not_zero_division() -> None:
    assert all(math.isnan(v) for v in Counts().result().values())


class TriggerReader(nn.Module):
    """Predicts the class written in pixel (0, 0) as value/10, or TARGET when the pattern's
    white top-left cell (3, 23) is white, unless pixel (0, 1) marks the image robust."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.training)
        pred = (x[:, 0, 0, 0] * 10).round().long()
        fooled = (x[:, 0, 3, 23] == 1.0) & (x[:, 0, 0, 1] < 0.5)
        pred = torch.where(fooled, torch.full_like(pred, TARGET), pred)
        return MARGIN * F.one_hot(pred, NUM_CLASSES).float()


def make_batch(rows: list[tuple[int, int, bool]]) -> Batch:
    """Rows of (true label, clean prediction, robust) as grey 1x28x28 images."""
    x = torch.full((len(rows), 1, 28, 28), 0.5)
    for i, (_, pred, robust) in enumerate(rows):
        x[i, 0, 0, 0] = pred / 10
        x[i, 0, 0, 1] = 1.0 if robust else 0.0
    return Batch.make(x, torch.tensor([label for label, _, _ in rows]))


BATCHES = [
    make_batch([(1, 1, False), (8, 8, False), (2, 5, True)]),
    make_batch([(3, 3, True), (8, 2, False), (4, 4, False), (5, 5, False), (6, 0, False)]),
]


def pattern() -> Synthesizer:
    synth = SYNTHESIZERS.build("pattern", {"target": TARGET}, "synthesizer")
    synth.bind((1, 28, 28), NUM_CLASSES)
    return synth


def test_evaluate_with_pattern_trigger_gives_expected_numbers() -> None:
    model = TriggerReader()
    result = evaluate(model, BATCHES, pattern())
    # Clean: 5 of 8 predictions right. Triggered: the 6 non-robust rows predict 8.
    # Eligible (label != 8): 6 rows, 4 of them non-robust (fooled); of the 2 robust
    # ones, the one with label 3 is still classified correctly.
    assert result["clean_accuracy"] == pytest.approx(5 / 8)
    assert result["clean_loss"] == pytest.approx((5 * LOSS_RIGHT + 3 * LOSS_WRONG) / 8)
    assert result["asr"] == pytest.approx(4 / 6)
    assert result["robust_accuracy"] == pytest.approx(1 / 6)
    assert result["backdoor_accuracy"] == pytest.approx(6 / 8)
    assert result["backdoor_loss"] == pytest.approx((6 * LOSS_RIGHT + 2 * LOSS_WRONG) / 8)


def test_evaluate_runs_the_model_in_eval_mode_and_restores_training_mode() -> None:
    model = TriggerReader()
    model.train()
    evaluate(model, BATCHES, pattern())
    assert model.modes and not any(model.modes)
    assert model.training
    model.eval()
    evaluate(model, BATCHES, None)
    assert not model.training


def test_evaluate_without_synthesizer_reports_clean_metrics_only() -> None:
    result = evaluate(TriggerReader(), BATCHES, None)
    assert result["clean_accuracy"] == pytest.approx(5 / 8)
    assert math.isnan(result["asr"])
    assert math.isnan(result["backdoor_accuracy"])


def test_evaluate_does_not_modify_the_clean_batches() -> None:
    before = [b.inputs.clone() for b in BATCHES]
    evaluate(TriggerReader(), BATCHES, pattern())
    assert all(torch.equal(b.inputs, x) for b, x in zip(BATCHES, before, strict=True))
