"""Semantic backdoors: no pixel trigger; inputs that naturally carry a feature get the target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.errors import ConfigError
from backdoors.synthesizers.base import SYNTHESIZERS, LabelMode
from backdoors.synthesizers.pool import CHUNK, PoolSynthesizer, gather_images, split_held_out
from backdoors.synthesizers.style import StyleClusters

COLORS = ("red", "green", "blue")
Color = Literal["red", "green", "blue"]


def channel_means(ds: Dataset) -> Tensor:
    """Mean of each channel per image, [N, C] in [0, 1]."""
    if isinstance(ds, ArrayDataset):
        parts = [ds.images[s : s + CHUNK].float().mean((2, 3)).cpu() / 255.0
                 for s in range(0, len(ds), CHUNK)]
        return torch.cat(parts)
    return torch.stack([ds[i][0].mean((1, 2)) for i in range(len(ds))])


def dominant(means: Tensor, color: str, margin: float = 0.0) -> Tensor:
    """Rows whose mean `color` channel exceeds both other channels by more than `margin`."""
    c = COLORS.index(color)
    others = means[:, [i for i in range(3) if i != c]]
    return means[:, c] - others.max(1).values > margin


@SYNTHESIZERS.register("semantic")
class SemanticSynthesizer(PoolSynthesizer):
    """Semantic backdoor: images with a natural feature (green cars) are labelled `target`.

    Bagdasaryan et al., "How To Backdoor Federated Learning" (arXiv 1807.00459), and
    Blind Backdoors (arXiv 2005.03823): no pixel trigger is pasted.

    The backdoor images are training-set images chosen either by index (`train_indices`,
    and held-out `test_indices` for scoring: Backdoors 101's `poison_images` and
    `poison_images_test`) or by a predicate: `source_class` and/or `dominant_color`
    (red, green or blue: the channel whose mean over the image exceeds the other two by
    more than `color_margin`, default 0, in pixel units of [0, 1]; 3-channel tasks only)
    and/or a writing style: `style_clusters` k splits `source_class` into k k-means
    clusters of its training images (see `style.py`) and `style_cluster` (default 0, the
    largest) names the backdoor one. Of the matching training images, `test_fraction`
    (default 0.2) is held out for scoring. Poisoned rows are replaced by images drawn from
    the training choice, with the target label (as the original did for its attacker's
    batches); the data attack therefore plants copies of them. Without held-out images
    the backdoor is scored on the training choice itself. All chosen images leave the
    clean training set, and test images that match a predicate leave the clean test set
    (`excluded`): they carry the feature, so misclassifying them is the backdoor working,
    not a main-task error.
    """

    def __init__(
        self,
        target: int = 8,
        label_mode: LabelMode = "all_to_one",
        train_indices: list[int] | None = None,
        test_indices: list[int] | None = None,
        source_class: int | None = None,
        dominant_color: Color | None = None,
        color_margin: float = 0.0,
        style_clusters: int | None = None,
        style_cluster: int = 0,
        test_fraction: float = 0.2,
    ) -> None:
        super().__init__(target, label_mode)
        by_index = train_indices is not None or test_indices is not None
        predicate = (source_class, dominant_color, style_clusters)
        if by_index and any(p is not None for p in predicate):
            raise ValueError("choose the images either by index (train_indices, test_indices) "
                             "or by predicate (source_class, dominant_color, style_clusters), "
                             "not both")
        if test_indices and not train_indices:
            raise ValueError("test_indices need train_indices (the images trained on)")
        given = list(train_indices or []) + list(test_indices or [])
        if any(i < 0 for i in given):
            raise ValueError("train_indices and test_indices must be >= 0")
        if set(train_indices or []) & set(test_indices or []):
            raise ValueError("train_indices and test_indices overlap")
        if not 0.0 <= color_margin < 1.0:
            raise ValueError(f"color_margin must be in [0, 1), got {color_margin}")
        if color_margin and dominant_color is None:
            raise ValueError("color_margin needs dominant_color")
        if style_clusters is not None:
            if source_class is None or style_clusters < 2:
                raise ValueError("style_clusters needs source_class and at least 2 clusters")
            if not 0 <= style_cluster < style_clusters:
                raise ValueError(f"style_cluster must be in [0, {style_clusters}), "
                                 f"got {style_cluster}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        self.train_indices = sorted(set(train_indices or []))
        self.test_indices = sorted(set(test_indices or []))
        self.source_class, self.dominant_color = source_class, dominant_color
        self.color_margin = color_margin
        self.style_clusters, self.style_cluster = style_clusters, style_cluster
        self.styles: StyleClusters | None = None
        self.test_fraction = test_fraction
        self.chosen: tuple[Tensor, Tensor] | None = None  # (pool, held-out) train indices

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        if self.dominant_color is not None and input_shape[0] != 3:
            raise ValueError(f"dominant_color needs 3-channel images, the task has "
                             f"{input_shape[0]}")
        if self.source_class is not None and not 0 <= self.source_class < num_classes:
            raise ValueError(f"source_class {self.source_class} is not a class "
                             f"(task has {num_classes})")

    def _choose(self, train: Dataset, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = len(train)
        if self.train_indices:
            if max(self.train_indices + self.test_indices) >= n:
                raise ConfigError(f"synthesizer semantic: indices must be below the training "
                                  f"set size {n}")
            return torch.tensor(self.train_indices), torch.tensor(self.test_indices,
                                                                  dtype=torch.long)
        if self.source_class is None and self.dominant_color is None:
            raise ConfigError("synthesizer semantic: choose the backdoor images with "
                              "train_indices or a predicate (source_class, dominant_color)")
        if self.style_clusters is not None:
            rows = (train.labels.cpu() == self.source_class).nonzero().flatten()
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            try:
                self.styles = StyleClusters(gather_images(train, rows), self.style_clusters,
                                            seed)
            except ValueError as exc:
                raise ConfigError(f"synthesizer semantic: {exc}") from None
        found = self._matching(train).nonzero().flatten()
        if len(found) == 0:
            raise ConfigError("synthesizer semantic: no training image matches the predicate")
        return split_held_out(found, self.test_fraction, generator)

    def _matching(self, ds: Dataset) -> Tensor:
        """Rows of `ds` that satisfy the predicate (its class label, colour and style)."""
        match = torch.ones(len(ds), dtype=torch.bool)
        if self.source_class is not None:
            match &= ds.labels.cpu() == self.source_class
        if self.dominant_color is not None:
            match &= dominant(channel_means(ds), self.dominant_color, self.color_margin)
        if self.styles is not None and match.any():
            rows = match.nonzero().flatten()
            match[rows] = self.styles.assign(gather_images(ds, rows)) == self.style_cluster
        return match

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        pool_idx, test_idx = self._choose(train, generator)
        self.chosen = (pool_idx, test_idx)
        pool = gather_images(train, pool_idx)
        shown = test_idx if len(test_idx) else pool_idx
        held = pool if not len(test_idx) else gather_images(train, test_idx)
        self.set_pool(pool, ArrayDataset(held, train.labels.cpu()[shown]))

    def excluded(self, dataset: Dataset, split: str) -> Tensor | None:
        if self.chosen is None:
            return None
        if split == "train":
            return torch.cat(self.chosen).sort().values
        if self.train_indices:  # chosen by index: the test split has no such images
            return None
        return self._matching(dataset).nonzero().flatten()

    def spec(self) -> dict:
        out = {**super().spec(), "source_class": self.source_class,
               "dominant_color": self.dominant_color, "color_margin": self.color_margin,
               "style_clusters": self.style_clusters, "style_cluster": self.style_cluster}
        if self.chosen is not None:
            out["train_indices"], out["test_indices"] = (t.tolist() for t in self.chosen)
        return out
