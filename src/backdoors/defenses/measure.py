"""How defenses are judged: detection (AUROC, TPR at 5% FPR), removal (how many samples
were set apart, their recall and precision) and mitigation (clean accuracy, ASR and RA
before and after, DER). Each stage base calls the ones that fit it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.defenses.progress import SILENT, Progress
from backdoors.defenses.scores import auroc, der, tpr_at_fpr
from backdoors.defenses.target import DefenseTarget
from backdoors.seeds import DEFENSE, stream

FPR = 0.05
HEADLINE = ("clean_accuracy", "asr", "robust_accuracy", "backdoor_accuracy")


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures a defense result shows of an evaluation."""
    return {k: metrics.get(k) for k in HEADLINE}


def mitigation(target: DefenseTarget, before: dict[str, Any], model: nn.Module
               ) -> dict[str, Any]:
    """Figures of the defended model and the DER against the attacked one."""
    after = target.evaluate(model)
    return {"after": headline(after),
            "der": der(before["clean_accuracy"], after["clean_accuracy"], before["asr"],
                       after["asr"])}


def detection(scores: Tensor, positive: Tensor) -> dict[str, float]:
    return {"auroc": auroc(scores, positive), "tpr_at_5_fpr": tpr_at_fpr(scores, positive, FPR)}


def removal(flagged: Tensor, poisoned: Tensor, key: str) -> dict[str, Any]:
    """How many samples a defense set apart, the share of the poisoned ones among them
    (recall: of all poisoned; precision: of those set apart); None where undefined."""
    hits = int((flagged & poisoned).sum())
    n, n_poisoned = int(flagged.sum()), int(poisoned.sum())
    return {key: n, f"{key}_recall": hits / n_poisoned if n_poisoned else None,
            f"{key}_precision": hits / n if n else None}


def recall_at(scores: Tensor, poisoned: Tensor, factor: float) -> float | None:
    """Share of poisoned samples among the top factor * |poisoned| scores (the removal
    budget of spectral signatures)."""
    n_poisoned = int(poisoned.sum())
    if n_poisoned == 0:
        return None
    k = min(len(scores), int(round(factor * n_poisoned)))
    top = torch.zeros(len(scores), dtype=torch.bool)
    top[scores.topk(k).indices] = True
    return int((top & poisoned).sum()) / n_poisoned


@torch.no_grad()
def input_detection(score: Any, model: nn.Module, target: DefenseTarget,
                    progress: Progress = SILENT, limit: int | None = None
                    ) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Score clean test inputs against triggered test inputs whose label is not the
    backdoor label; `score(model, x)` is the detector's suspicion per input. `limit`
    scores only the first `limit` inputs of each kind (in test-set order), for detectors
    whose cost per input is large. Returns the detection figures, the scores and which of
    them are triggered."""
    synth = target.synthesizer
    gen = stream(target.seed, DEFENSE)
    clean_scores, trig_scores = [], []
    clean = progress.phase(target.test_loader, "scoring clean test inputs")
    for batch in first_rows(clean, every_row, limit):
        clean_scores.append(score(model, batch.inputs).cpu())
    triggerable = progress.phase(target.backdoor_loader or target.test_loader,
                                 "scoring triggered test inputs")
    for batch in first_rows(triggerable, lambda b: synth.counted(b) & synth.eligible(b),
                            limit):
        triggered = synth.apply(batch, 1.0, gen)
        trig_scores.append(score(model, triggered.inputs).cpu())
    scores = torch.cat(clean_scores + trig_scores)
    positive = torch.cat([torch.zeros(sum(len(s) for s in clean_scores), dtype=torch.bool),
                          torch.ones(sum(len(s) for s in trig_scores), dtype=torch.bool)])
    return detection(scores, positive), scores, positive


def every_row(batch: Batch) -> Tensor:
    """A mask keeping every row of `batch`, on its device."""
    return torch.ones(len(batch), dtype=torch.bool, device=batch.inputs.device)


def first_rows(batches: Iterable[Batch], keep: Callable[[Batch], Tensor],
               limit: int | None) -> Iterator[Batch]:
    """The rows of `batches` that `keep` marks, up to `limit` of them in all (None: no
    limit); batches left with no row are skipped."""
    taken = 0
    for batch in batches:
        rows = keep(batch)
        if limit is not None:
            rows = rows & (rows.cumsum(0) <= limit - taken)
        n = int(rows.sum())
        if n:
            taken += n
            yield batch if n == len(rows) else batch.select(rows)
        if limit is not None and taken >= limit:
            return
