"""What defenses return: one typed result per stage, and what the runner records.

Every result carries `figures` (JSON-ready numbers a defense reports beyond what its stage
measures) and `artifacts` (tensors the runner draws as PNGs: 1-D scores become a
histogram, image tensors a grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass(kw_only=True)
class DefenseResult:
    """Extra figures and pictures of a defense."""

    figures: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Tensor] = field(default_factory=dict)


@dataclass(kw_only=True)
class Sanitized(DefenseResult):
    """A dataset sanitizer's verdict on the training set: a suspicion score per sample
    (higher = more likely poisoned; judged threshold-free by AUROC) and the samples its
    own rule removes (judged by recall and precision)."""

    scores: Tensor
    removed: Tensor


@dataclass(kw_only=True)
class Inspection(DefenseResult):
    """A model inspector's verdict: an anomaly index per class and the classes it flags
    as backdoor targets."""

    anomaly_index: Tensor
    flagged: list[int]


@dataclass(kw_only=True)
class Repaired(DefenseResult):
    """A repaired copy of the model."""

    model: nn.Module


@dataclass(kw_only=True)
class Trained(DefenseResult):
    """What a training-time defense returns: its model, optionally a suspicion score per
    training sample (higher = more likely poisoned) and the samples it set apart."""

    model: nn.Module
    scores: Tensor | None = None
    flagged: Tensor | None = None


@dataclass(kw_only=True)
class Outcome(DefenseResult):
    """What the runner records: the stage's measurements and the defense's own figures
    (result.json), its artifacts (PNGs), and the defended model where the defense made
    one (saved next to them)."""

    model: nn.Module | None = None
