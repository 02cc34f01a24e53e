"""Adaptive-Blend: a blended trigger planted piecewise, with correctly labelled cover samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.data.dataset import Dataset
from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer
from backdoors.synthesizers.images import TriggerImage
from backdoors.synthesizers.surrogate import TrainingRows, in_memory


def piece_map(height: int, width: int, grid: int) -> Tensor:
    """[H, W] index of the grid x grid piece each pixel belongs to (row-major)."""
    rows = torch.arange(height) * grid // height
    cols = torch.arange(width) * grid // width
    return rows[:, None] * grid + cols[None, :]


@SYNTHESIZERS.register("adaptive_blend")
class AdaptiveBlendSynthesizer(Synthesizer):
    """Adaptive-Blend (Qi, Xie, Li, Mahloujifar & Mittal, "Revisiting the Assumption of
    Latent Separability for Backdoor Defenses", ICLR 2023, OpenReview _wSHsgrVali; arXiv
    2205.13613): a blended trigger split into pieces, planted partially while poisoning
    and in full at test time, with cover samples that keep their true labels.

    The pattern (uniform noise from `seed`, or the picture at `image`, read like the blend
    trigger's; the paper blends a Hello Kitty image) is divided into a `grid` x `grid`
    (4 x 4) grid of pieces. Each poisoned training row gets a random `piece_ratio` (0.5)
    of the pieces, blended with `alpha` 0.15; a `cover_ratio` (0.5) share of those rows
    keep their true label ("regularisation" samples that suppress the latent separation
    between poisoned and clean samples), the rest take the backdoor label ("payload"
    samples). Test inputs get every piece at `test_alpha` 0.2. The paper poisons 150
    payload + 150 cover images of CIFAR-10's 50,000 (0.3% + 0.3%): the data attack with
    `ratio` 0.006.

    `prepare()` draws, per training image, its pieces and whether it is a cover sample,
    and remembers the training images so poisoning (which hands over stored pixels) can be
    told from test inputs. Before `prepare()` every row is treated as a test input: full
    trigger, backdoor label.
    """

    def __init__(
        self,
        alpha: float = 0.15,
        test_alpha: float = 0.2,
        grid: int = 4,
        piece_ratio: float = 0.5,
        cover_ratio: float = 0.5,
        seed: int = 0,
        image: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not (0.0 < alpha <= 1.0 and 0.0 < test_alpha <= 1.0):
            raise ValueError("alpha and test_alpha must be in (0, 1]")
        if grid < 1 or not 0.0 < piece_ratio <= 1.0 or not 0.0 <= cover_ratio < 1.0:
            raise ValueError("need grid >= 1, 0 < piece_ratio <= 1 and 0 <= cover_ratio < 1")
        self.alpha, self.test_alpha, self.grid = alpha, test_alpha, grid
        self.piece_ratio, self.cover_ratio = piece_ratio, cover_ratio
        self.seed, self.image = seed, image
        # Read now so that a missing file fails at config validation, not after data loads.
        self.picture = None if image is None else TriggerImage.read(image)
        self.rows = TrainingRows()
        self.keep = torch.empty(0, grid * grid, dtype=torch.bool)  # training row -> pieces
        self.cover = torch.empty(0, dtype=torch.bool)  # training row -> keeps its label
        self._draw_pattern()

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        h, w = input_shape[1:]
        if self.grid > min(h, w):
            raise ValueError(f"a {self.grid}x{self.grid} grid of pieces does not fit {h}x{w}")
        self._draw_pattern()

    def _draw_pattern(self) -> None:
        c, h, w = self.input_shape
        if self.picture is None:
            self.pattern = torch.rand((c, h, w), generator=torch.Generator().manual_seed(self.seed))
            self.opacity = torch.ones(1, h, w)
        else:  # transparent parts of a picture leave the image alone
            self.pattern, self.opacity = self.picture.image(c, (h, w)), self.picture.mask((h, w))
        self.pieces = piece_map(h, w, self.grid)

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        data = in_memory(train, self.name)
        self.rows = TrainingRows(data.images)
        n, total = len(data), self.grid * self.grid
        kept = max(1, round(self.piece_ratio * total))
        # A random permutation rank per piece: the `kept` lowest ranks are planted.
        ranks = torch.rand(n, total, generator=generator).argsort(1).argsort(1)
        self.keep = ranks < kept
        self.cover = torch.rand(n, generator=generator) < self.cover_ratio

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        found = self.rows.find(x)
        training = found >= 0
        weight = torch.full((len(x), *self.pieces.shape), self.test_alpha)
        if bool(training.any()):
            planted = self.keep[found[training]][:, self.pieces]  # [n, H, W]
            weight[training] = planted.float() * self.alpha
        weight = (weight[:, None] * self.opacity).to(x)
        return x * (1 - weight) + self.pattern.to(x) * weight

    def synthesize_labels(self, batch: Batch) -> Tensor:
        labels = super().synthesize_labels(batch)
        found = self.rows.find(batch.inputs)
        cover = torch.zeros(len(found), dtype=torch.bool)
        cover[found >= 0] = self.cover[found[found >= 0]]
        return torch.where(cover.to(labels.device), batch.labels, labels)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"pattern": self.pattern, "opacity": self.opacity}

    def spec(self) -> dict:
        return {**super().spec(), "alpha": self.alpha, "test_alpha": self.test_alpha,
                "grid": self.grid, "piece_ratio": self.piece_ratio,
                "cover_ratio": self.cover_ratio, "seed": self.seed,
                "image": self.image}
