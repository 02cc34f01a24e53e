"""Datasets: in-memory uint8 tensors (the fast path) and streaming datasets (large folders)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class ArrayDataset:
    """A dataset that fits in memory: uint8 images [N, C, H, W], int64 labels [N].

    `aux` holds optional auxiliary labels ([N] or [N, k], int64), e.g. the identity in a
    counting task or the two digits of a MultiMNIST number.
    """

    images: Tensor
    labels: Tensor
    aux: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Tensor | slice) -> ArrayDataset:
        aux = None if self.aux is None else self.aux[indices]
        return ArrayDataset(self.images[indices], self.labels[indices], aux)

    def to(self, device: torch.device | str) -> ArrayDataset:
        aux = None if self.aux is None else self.aux.to(device)
        return ArrayDataset(self.images.to(device), self.labels.to(device), aux)


class StreamingDataset(Protocol):
    """A dataset read sample by sample (image folders too large for memory).

    `__getitem__` returns (float image [C, H, W] in [0, 1], label, aux or -1); a standard
    torch DataLoader with workers batches it.
    """

    labels: Tensor

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]: ...


Dataset = ArrayDataset | StreamingDataset


def take_first(dataset: Dataset, n: int | None) -> Dataset:
    """The first n samples (or all when n is None); used by max_*_samples."""
    if n is None or n >= len(dataset):
        return dataset
    if isinstance(dataset, ArrayDataset):
        return dataset.subset(slice(0, n))
    return torch.utils.data.Subset(dataset, range(n))  # type: ignore[return-value]
