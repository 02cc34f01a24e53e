"""A training or test batch, with the bookkeeping attacks and metrics need."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """Inputs in pixel space [0, 1], labels, optional auxiliary labels, and masks.

    `poisoned[i]` says whether row i carries a backdoor; `indices[i]` is the row's index
    in its dataset (-1 for rows that do not come from one). After a synthesizer runs,
    `labels` of poisoned rows hold the backdoor labels; callers keep the clean batch when
    they need the true ones. `aux` may have extra dimensions (e.g. [N, 2] digit pairs).
    """

    inputs: Tensor
    labels: Tensor
    indices: Tensor
    poisoned: Tensor
    aux: Tensor | None = None

    @classmethod
    def make(
        cls,
        inputs: Tensor,
        labels: Tensor,
        indices: Tensor | None = None,
        aux: Tensor | None = None,
    ) -> Batch:
        n = inputs.shape[0]
        if indices is None:
            indices = torch.full((n,), -1, dtype=torch.long, device=inputs.device)
        poisoned = torch.zeros(n, dtype=torch.bool, device=inputs.device)
        return cls(inputs, labels, indices, poisoned, aux)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        fields = ("inputs", "labels", "indices", "poisoned", "aux")
        return Batch(*(move(getattr(self, f)) for f in fields))

    def select(self, rows: Tensor | slice) -> Batch:
        """Rows by boolean mask, index tensor or slice (a view where torch allows it)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Batch(
            self.inputs[rows], self.labels[rows], self.indices[rows], self.poisoned[rows],
            pick(self.aux),
        )

    def with_(self, **changes: Tensor | None) -> Batch:
        return replace(self, **changes)

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        aux = None if batches[0].aux is None else torch.cat([b.aux for b in batches])
        return Batch(
            torch.cat([b.inputs for b in batches]),
            torch.cat([b.labels for b in batches]),
            torch.cat([b.indices for b in batches]),
            torch.cat([b.poisoned for b in batches]),
            aux,
        )
