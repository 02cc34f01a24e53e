"""Clean training, data poisoning and batch poisoning."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backdoors.attacks.base import (
    ATTACKS,
    PerSampleAttack,
    PerSampleStep,
    StepReport,
    cross_entropy_rows,
    cross_entropy_step,
)
from backdoors.attacks.poisoned_sets import PoisonedStream, poison_array_dataset
from backdoors.batch import Batch
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.synthesizers.base import Synthesizer


@ATTACKS.register("none")
class NoAttack(PerSampleAttack):
    """Clean training: no backdoor (the baseline every attack is compared with)."""

    def backward(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> StepReport:
        return cross_entropy_step(model, batch)

    def per_sample_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> PerSampleStep:
        return cross_entropy_rows(batch)


@ATTACKS.register("data")
class DataPoisoning(PerSampleAttack):
    """Data poisoning (BadNets, Gu et al., arXiv 1708.06733): a fixed subset of the training
    set gets the trigger and the backdoor label once, before training.

    `ratio` (default 0.1) of the training set, or an explicit `indices` list. With
    `clean_label: true` only samples already labelled as the target are poisoned and
    labels are left untouched; `ratio` is then still a fraction of the whole training set
    (as in BackdoorBench), capped by the number of target-class samples.
    """

    def __init__(
        self, ratio: float = 0.1, indices: list[int] | None = None, clean_label: bool = False
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.ratio, self.indices, self.clean_label = ratio, indices, clean_label

    def bind(self, synthesizer: Synthesizer, model: nn.Module) -> None:
        super().bind(synthesizer, model)
        if self.clean_label:  # refuse all-to-all or label functions before any data loads
            synthesizer.single_target("attack data with clean_label: true")

    def choose(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Indices to poison, sorted; drawn with `generator` unless given explicitly."""
        n = len(labels)
        if self.indices is not None:
            idx = torch.tensor(sorted(set(self.indices)), dtype=torch.long)
            if len(idx) and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"poison indices must be in [0, {n}); got {int(idx.max())}")
            return idx
        pool = torch.arange(n)
        if self.clean_label:
            target = self.synthesizer.single_target("attack data with clean_label: true")
            pool = (labels.cpu() == target).nonzero().flatten()
        k = min(len(pool), int(round(self.ratio * n)))
        return pool[torch.randperm(len(pool), generator=generator)[:k]].sort().values

    def poison_training_set(
        self, dataset: Dataset, generator: torch.Generator
    ) -> tuple[Dataset, Tensor]:
        idx = self.choose(dataset.labels, generator)
        keep = self.clean_label
        if isinstance(dataset, ArrayDataset):
            return poison_array_dataset(dataset, idx, self.synthesizer, generator, keep), idx
        return PoisonedStream(dataset, idx, self.synthesizer, keep), idx

    def backward(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> StepReport:
        return cross_entropy_step(model, batch)

    def per_sample_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> PerSampleStep:
        return cross_entropy_rows(batch)


@ATTACKS.register("batch")
class BatchPoisoning(PerSampleAttack):
    """Batch poisoning: each training batch gets the trigger on its first round(B * fraction)
    rows (fraction > 1 means all), so the backdoor task shares the batch with the main task.
    Default fraction 0.1."""

    def __init__(self, fraction: float = 0.1) -> None:
        if fraction < 0:
            raise ValueError(f"fraction must be >= 0, got {fraction}")
        self.fraction = fraction

    def backward(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> StepReport:
        return cross_entropy_step(model, self.synthesizer.apply(batch, self.fraction, generator))

    def per_sample_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> PerSampleStep:
        # A poisoned row stays the privacy unit of the training row it was made from.
        return cross_entropy_rows(self.synthesizer.apply(batch, self.fraction, generator))
