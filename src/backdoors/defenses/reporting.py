"""An input detector that reports what its calibration found.

The input stage measures a detector by its scores alone (AUROC, TPR at 5% FPR and the
clean/triggered histogram scores.png, defenses/measure.py). Detectors that calibrate on
the clean budget (SCALE-UP's class statistics, IBD-PSC's layer selection, Beatrix's
ranges, Cognitive Distillation's clean mask norms) also have numbers and pictures a
person checks when a detection fails; this base records them next to the stage's
figures: `self.figures` in result.json, `self.artifacts` as PNGs. A detector may also
`keep` something per scored input (TeCo's first-flip severities, Cognitive
Distillation's patterns); once the stage has scored, `describe` gets it split into
clean and triggered inputs, to show what tells them apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DefenseData, InputDetector
from backdoors.defenses.results import Outcome
from backdoors.defenses.target import DefenseTarget


class ReportingDetector(InputDetector):
    """InputDetector whose `fit`/`score` may fill `figures` and `artifacts`."""

    def __init__(self, **base: Any) -> None:
        super().__init__(**base)
        self.figures: dict[str, Any] = {}
        self.artifacts: dict[str, Tensor] = {}
        self._kept: list[Tensor] | None = None

    def measure(self, model: nn.Module, data: DefenseData, target: DefenseTarget,
                before: dict[str, Any]) -> Outcome:
        self._kept = []
        measured = super().measure(model, data, target, before)
        kept, self._kept = self._kept, None
        if kept:
            self.describe(torch.cat(kept), measured.artifacts["positive"])
        return Outcome(figures={**measured.figures, **self.figures},
                       artifacts={**measured.artifacts, **self.artifacts})

    def keep(self, values: Tensor) -> None:
        """Record `values` [N, ...] of the N inputs just scored (only while measuring)."""
        if self._kept is not None:
            self._kept.append(values.detach().cpu())

    def describe(self, kept: Tensor, positive: Tensor) -> None:  # noqa: B027 - optional
        """Turn what `score` kept, one row per scored input in scoring order, into
        figures and artifacts; `positive` marks the triggered inputs."""
