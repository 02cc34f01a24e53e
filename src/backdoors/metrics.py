"""Evaluation metrics, counted per sample (never a mean of batch means)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.synthesizers.base import Synthesizer


@dataclass
class Counts:
    """Running per-sample sums over a test set; `result()` turns them into fractions."""

    total: int = 0
    clean_correct: int = 0
    clean_loss: float = 0.0
    triggered: int = 0
    backdoor_correct: int = 0
    backdoor_loss: float = 0.0
    eligible: int = 0
    attack_success: int = 0
    robust_correct: int = 0

    def result(self) -> dict[str, float]:
        div = lambda a, b: a / b if b else float("nan")  # noqa: E731
        return {
            "clean_accuracy": div(self.clean_correct, self.total),
            "clean_loss": div(self.clean_loss, self.total),
            "asr": div(self.attack_success, self.eligible),
            "backdoor_accuracy": div(self.backdoor_correct, self.triggered),
            "robust_accuracy": div(self.robust_correct, self.eligible),
            "backdoor_loss": div(self.backdoor_loss, self.triggered),
        }


def update_clean(counts: Counts, logits: Tensor, labels: Tensor) -> None:
    counts.total += len(labels)
    counts.clean_correct += int((logits.argmax(1) == labels).sum())
    counts.clean_loss += float(F.cross_entropy(logits, labels, reduction="sum"))


def update_backdoor(
    counts: Counts, logits: Tensor, true_labels: Tensor, backdoor_labels: Tensor
) -> None:
    """ASR and RA over rows whose true label differs from the backdoor label; backdoor
    accuracy (the Backdoors 101 figure) over all triggered rows."""
    pred = logits.argmax(1)
    eligible = true_labels != backdoor_labels
    counts.triggered += len(true_labels)
    counts.backdoor_correct += int((pred == backdoor_labels).sum())
    counts.backdoor_loss += float(F.cross_entropy(logits, backdoor_labels, reduction="sum"))
    counts.eligible += int(eligible.sum())
    counts.attack_success += int((pred == backdoor_labels)[eligible].sum())
    counts.robust_correct += int((pred == true_labels)[eligible].sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: object,
    synthesizer: Synthesizer | None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Clean accuracy/loss and, with a synthesizer, ASR, backdoor accuracy (all inputs),
    robust accuracy and backdoor loss, on every batch of `batches` (an iterable of Batch).
    """
    was_training = model.training
    model.eval()
    counts = Counts()
    for batch in batches:  # type: ignore[attr-defined]
        assert isinstance(batch, Batch)
        update_clean(counts, model(batch.inputs), batch.labels)
        if synthesizer is not None:
            triggered = synthesizer.apply(batch, 1.0, generator)
            update_backdoor(counts, model(triggered.inputs), batch.labels, triggered.labels)
    model.train(was_training)
    return counts.result()
