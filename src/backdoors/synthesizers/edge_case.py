"""Edge-case backdoors: rare inputs from the tail of the distribution get the target label."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.data import TASKS
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.errors import ConfigError
from backdoors.synthesizers.base import SYNTHESIZERS, LabelMode
from backdoors.synthesizers.pool import CHUNK, PoolSynthesizer, gather_images, split_held_out

# ITU-R BT.601 luma weights, to turn colour sources into greyscale inputs.
LUMA = (0.299, 0.587, 0.114)


def fit_images(images: Tensor, shape: Sequence[int]) -> Tensor:
    """uint8 images [N, c, h, w] converted to `shape` (C, H, W): grey -> colour by repeating
    the channel, colour -> grey by luma, then resized (bilinear, antialiased)."""
    c_out, h, w = shape
    parts = []
    for s in range(0, len(images), CHUNK):
        x = images[s : s + CHUNK].float()
        if x.shape[1] != c_out:
            if x.shape[1] == 1:
                x = x.expand(-1, c_out, -1, -1)
            elif x.shape[1] == 3 and c_out == 1:
                x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise ConfigError(f"cannot turn {x.shape[1]}-channel edge-case images into "
                                  f"{c_out}-channel inputs")
        if x.shape[2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=True)
        parts.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(parts)


def _rows_of(ds: Dataset, label: int | None) -> Tensor:
    labels = ds.labels.cpu()
    return torch.arange(len(labels)) if label is None else (labels == label).nonzero().flatten()


@SYNTHESIZERS.register("edge_case")
class EdgeCaseSynthesizer(PoolSynthesizer):
    """Edge-case backdoor: rare inputs the main task never sees are labelled `target`.

    Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated Learning"
    (arXiv 2007.05084).

    The source is either a class of the task itself, held out of the main task
    (`source_class`; `test_fraction`, default 0.2, of its training images is kept back
    for scoring, and the class should leave the clean train and test sets, see
    `excluded`), or a second dataset (`source_task: {name: ..., **options}`, any
    registered task, optionally only its `source_class`): its training images are the
    pool and its test images are scored, converted to this task's channels and size.
    Poisoned rows are replaced by pool images with the target label. Scored rows from a
    source task have no class of this task (true label -1), so every one counts for ASR.
    """

    def __init__(
        self,
        target: int = 8,
        label_mode: LabelMode = "all_to_one",
        source_class: int | None = None,
        source_task: dict[str, Any] | None = None,
        test_fraction: float = 0.2,
    ) -> None:
        super().__init__(target, label_mode)
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        self.source_class, self.test_fraction = source_class, test_fraction
        self.source_spec = dict(source_task) if source_task is not None else None
        self.source = None
        if source_task is not None:
            options = dict(source_task)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ValueError("source_task needs a task name: {name: ..., **options}")
            self.source = TASKS.build(name, options, "synthesizer.source_task")

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        classes = num_classes if self.source is None else self.source.num_classes
        if self.source_class is not None and not 0 <= self.source_class < classes:
            raise ValueError(f"source_class {self.source_class} is not a class of the source "
                             f"(it has {classes})")
        if self.source is None and self.source_class == self.target:
            raise ValueError("source_class and target are the same class")

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        if self.source is not None:
            rows = _rows_of(self.source.train, self.source_class)
            test_rows = _rows_of(self.source.test, self.source_class)
            if not len(rows) or not len(test_rows):
                raise ConfigError(f"synthesizer edge_case: the source task has no images of "
                                  f"class {self.source_class} in its train or test split")
            pool = fit_images(gather_images(self.source.train, rows), self.input_shape)
            held = fit_images(gather_images(self.source.test, test_rows), self.input_shape)
            labels = torch.full((len(held),), -1, dtype=torch.long)
            self.set_pool(pool, ArrayDataset(held, labels))
            return
        if self.source_class is None:
            raise ConfigError("synthesizer edge_case: set source_class (a class of this task "
                              "to hold out) or source_task (another dataset)")
        rows = _rows_of(train, self.source_class)
        if len(rows) < 2:
            raise ConfigError(f"synthesizer edge_case: class {self.source_class} has fewer "
                              "than 2 training images")
        pool_idx, held_idx = split_held_out(rows, self.test_fraction, generator)
        shown = held_idx if len(held_idx) else pool_idx
        self.set_pool(gather_images(train, pool_idx),
                      ArrayDataset(gather_images(train, shown), train.labels.cpu()[shown]))

    def excluded(self, dataset: Dataset, split: str) -> Tensor | None:
        if self.source is not None or self.source_class is None:
            return None
        return _rows_of(dataset, self.source_class)

    def spec(self) -> dict:
        return {**super().spec(), "source_class": self.source_class,
                "source_task": self.source_spec}
