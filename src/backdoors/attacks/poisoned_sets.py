"""Training sets with a fixed poisoned subset (data poisoning)."""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.data.dataset import ArrayDataset, StreamingDataset
from backdoors.synthesizers.base import Synthesizer

CHUNK = 1024  # rows poisoned at once: bounded memory for large in-memory datasets


def poison_array_dataset(
    ds: ArrayDataset,
    indices: Tensor,
    synthesizer: Synthesizer,
    generator: torch.Generator,
    keep_labels: bool = False,
) -> ArrayDataset:
    """A copy of `ds` whose rows at `indices` carry the trigger (and backdoor labels unless
    `keep_labels`). Poisoned pixels are stored as uint8, like a poisoned image file."""
    images, labels = ds.images.clone(), ds.labels.clone()
    for start in range(0, len(indices), CHUNK):
        idx = indices[start : start + CHUNK].to(images.device)
        aux = None if ds.aux is None else ds.aux[idx]
        part = Batch.make(images[idx].float() / 255.0, labels[idx], idx, aux)
        out = synthesizer.apply(part, 1.0, generator)
        images[idx] = (out.inputs.clamp(0, 1) * 255.0).round().to(torch.uint8)
        if not keep_labels:
            labels[idx] = out.labels
    return ArrayDataset(images, labels, ds.aux)


class PoisonedStream:
    """A streaming dataset whose samples at `indices` are triggered as they are read."""

    def __init__(
        self, base: StreamingDataset, indices: Tensor, synthesizer: Synthesizer, keep_labels: bool
    ) -> None:
        self.base, self.synthesizer, self.keep_labels = base, synthesizer, keep_labels
        self.poisoned = set(indices.tolist())
        self.labels = base.labels.clone()
        if not keep_labels and len(indices):
            aux = getattr(base, "aux", None)
            probe = Batch.make(torch.zeros(len(indices), 1, 1, 1), self.labels[indices], indices,
                               None if aux is None else aux[indices])
            self.labels[indices] = synthesizer.synthesize_labels(probe)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        x, y, aux = self.base[index]
        if index in self.poisoned:
            x = self.synthesizer.synthesize_inputs(x[None])[0]
            y = int(self.labels[index])
        return x, y, aux
