"""Turn datasets into batches of float pixels on the training device.

In-memory datasets are indexed directly (no DataLoader, no per-sample Python); streaming
datasets go through a torch DataLoader with workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.data.dataset import ArrayDataset, Dataset

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class Loader:
    """Iterates a dataset in batches; re-iterable, one pass per `iter()`.

    Shuffling and augmentation draw from `generator`, so a run is reproducible and its
    state can be checkpointed. `max_batches` stops each pass early (legacy max_batch_id).
    """

    dataset: Dataset
    batch_size: int
    device: torch.device
    shuffle: bool = False
    generator: torch.Generator | None = None
    augment: Augment | None = None
    max_batches: int | None = None
    num_workers: int = 0

    def __len__(self) -> int:
        n = -(-len(self.dataset) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.dataset, ArrayDataset):
            yield from self._iter_array(self.dataset)
        else:
            yield from self._iter_stream()

    def _order(self, n: int) -> Tensor:
        if self.shuffle:
            return torch.randperm(n, generator=self.generator)
        return torch.arange(n)

    def _iter_array(self, ds: ArrayDataset) -> Iterator[Batch]:
        order = self._order(len(ds)).to(ds.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = ds.images[idx].to(self.device, non_blocking=True).float().div_(255.0)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            aux = None if ds.aux is None else ds.aux[idx].to(self.device)
            yield Batch.make(x, ds.labels[idx].to(self.device), idx.to(self.device), aux)

    def _iter_stream(self) -> Iterator[Batch]:
        order = self._order(len(self.dataset)).tolist()
        loader = torch.utils.data.DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        start = 0
        for b, (x, y, aux) in enumerate(loader):
            if self.max_batches is not None and b >= self.max_batches:
                break
            idx = torch.tensor(order[start : start + len(y)], device=self.device)
            start += len(y)
            x = x.to(self.device, non_blocking=True)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            aux_t = aux.to(self.device) if bool((aux >= 0).any()) else None
            yield Batch.make(x, y.to(self.device), idx, aux_t)
