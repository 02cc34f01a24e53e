"""Evaluation metrics, counted per sample (never a mean of batch means)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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
    batches: Iterable[Batch],
    synthesizer: Synthesizer | None,
    generator: torch.Generator | None = None,
    backdoor_batches: Iterable[Batch] | None = None,
) -> dict[str, Any]:
    """Clean accuracy/loss on `batches`; with a synthesizer also ASR, backdoor accuracy (all
    inputs), robust accuracy and backdoor loss, on triggered copies of `backdoor_batches`
    (default: the same batches). Only rows the synthesizer `counted` are scored. A trigger
    with `variants` adds their figures under `variants` (pooled figures cover them all).
    """
    was_training = model.training
    model.eval()
    counts = Counts()
    for batch in batches:
        update_clean(counts, model(batch.inputs), batch.labels)
    variants: dict[str, Counts] = {}
    if synthesizer is not None:
        parts = synthesizer.variants() or {"": synthesizer}
        variants = {name: Counts() for name in parts}
        for batch in backdoor_batches if backdoor_batches is not None else batches:
            for name, synth in parts.items():
                keep = synth.counted(batch)
                part = batch.select(keep)
                if len(part) == 0:
                    continue
                triggered = synth.apply(part, 1.0, generator)
                logits = model(triggered.inputs)
                for target in (counts, variants[name]):
                    update_backdoor(target, logits, part.labels, triggered.labels)
    model.train(was_training)
    result: dict[str, Any] = counts.result()
    if len(variants) > 1:
        result["variants"] = {name: _backdoor_only(c.result()) for name, c in variants.items()}
    return result


def _backdoor_only(result: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in result.items() if not k.startswith("clean_")}
