"""TeCo: triggered inputs lose their prediction at very different corruption severities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, InputDetector
from backdoors.defenses.corruptions import CORRUPTIONS, corrupt

SEVERITIES = 5


def first_flip(preds: Tensor, original: Tensor) -> Tensor:
    """[K, N] severity (1-based) at which each corruption k first changes the prediction of
    each input, from `preds` [K, S, N] (corruption k at severity s + 1) and the
    uncorrupted prediction `original` [N]; S + 1 where no severity changes it."""
    severities = preds.shape[1]
    levels = torch.arange(1, severities + 1, device=preds.device)[None, :, None]
    flips = torch.where(preds != original[None, None], levels, severities + 1)
    return flips.amin(1)


def deviation(flips: Tensor) -> Tensor:
    """TeCo's score per input: the (population) standard deviation of its first-flip
    severities across the corruptions, rows of `flips` [K, N]."""
    return flips.double().std(0, correction=0)


@DEFENSES.register("teco")
class TeCo(InputDetector):
    """TeCo (CVPR 2023, arXiv 2303.18191): corruption robustness consistency.

    Liu, Li, Wang, Hu, Ye, Jin, Wu, Xiao, "Detecting Backdoors During the Inference Stage
    Based on Corruption Robustness Consistency".

    A clean image loses its prediction at about the same severity whatever the corruption;
    a triggered one survives some corruptions to the end (those that leave the trigger)
    and loses the target at once under others (those that break it). Each input is
    corrupted by every corruption of `corruptions` at severities 1..5 (ImageNet-C's), and
    for each corruption the first severity whose prediction differs from the uncorrupted
    one is recorded (6 when none does; the official code's `max`). Score: the standard
    deviation of these severities across the corruptions (higher = more suspicious). The
    paper reports AUROC over this deviation, as the runner does.

    `corruptions` (default: all twelve implemented, defenses/corruptions.py): the official
    code uses the 15 ImageNet-C corruptions of the `imagecorruptions` package; written
    here in plain torch are gaussian, shot and impulse noise, defocus, motion and zoom
    blur, fog, brightness, contrast, elastic transform, pixelate and JPEG; glass blur,
    snow and frost are not. Each corruption is applied to the input itself at each
    severity, as the paper defines them (the official script, as written, stores each
    corrupted copy back into the list it corrupts next, so its severities and
    corruptions compound). Data-free: needs no clean images, only the model's labels.
    Random corruptions (noise, motion angle, fog, elastic field) draw from the defense
    generator, so scores repeat for a given run seed and scoring order. The result
    lists, and draws as bars, the mean first-flip severity per corruption of clean and of
    triggered inputs.
    """

    uses_clean_data = False

    def __init__(self, corruptions: Sequence[str] = tuple(CORRUPTIONS), **base: Any) -> None:
        super().__init__(**base)
        corruptions = tuple(corruptions)
        unknown = [c for c in corruptions if c not in CORRUPTIONS]
        if len(corruptions) < 2 or unknown or len(set(corruptions)) != len(corruptions):
            raise ValueError(f"corruptions must be at least two distinct names among "
                             f"{sorted(CORRUPTIONS)}, got {list(corruptions)}")
        self.corruptions = corruptions
        self._generator: torch.Generator | None = None

    def fit(self, model: nn.Module, data: DefenseData) -> None:
        self._generator = data.generator

    @torch.no_grad()
    def flips(self, model: nn.Module, x: Tensor) -> Tensor:
        """[K, N] first-flip severity of each corruption for each input of x."""
        if self._generator is None:
            raise RuntimeError("call fit(model, data) before score(model, x)")
        was_training = model.training
        model.eval()
        original = model(x).argmax(1)
        preds = torch.stack([
            torch.stack([model(corrupt(x, name, s, self._generator)).argmax(1)
                         for s in range(1, SEVERITIES + 1)])
            for name in self.corruptions])
        model.train(was_training)
        return first_flip(preds, original)

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        flips = self.flips(model, x)
        self.keep(flips.T)
        return deviation(flips).float().cpu()

    def describe(self, kept: Tensor, positive: Tensor) -> None:
        """Mean first-flip severity per corruption of clean and of triggered inputs: the
        corruptions a trigger survives and those that break it (bars, in the order of
        `corruptions`)."""
        for label, rows in (("clean", kept[~positive]), ("triggered", kept[positive])):
            if len(rows):
                means = rows.double().mean(0)
                self.artifacts[f"first_flip_{label}"] = means.float()
                self.figures[f"first_flip_{label}"] = dict(
                    zip(self.corruptions, [round(float(m), 3) for m in means], strict=True))
