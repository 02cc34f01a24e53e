"""Triggers that substitute whole inputs from a pool of images chosen in `prepare`
(semantic and edge-case backdoors), and the helpers they share."""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.errors import ConfigError
from backdoors.synthesizers.base import LabelMode, Synthesizer

CHUNK = 4096  # images converted at once: bounded memory on large training sets


def to_uint8(x: Tensor) -> Tensor:
    """Pixels in [0, 1] -> uint8, the way datasets store them."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def gather_images(ds: Dataset, indices: Tensor) -> Tensor:
    """uint8 images [k, C, H, W] of an in-memory or streamed dataset at `indices` (k >= 1)."""
    if isinstance(ds, ArrayDataset):
        return ds.images[indices.to(ds.images.device)].cpu()
    return torch.stack([to_uint8(ds[int(i)][0]) for i in indices])


def split_held_out(indices: Tensor, fraction: float, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
    """Shuffle `indices` and hold out round(len * fraction) of them (keeping at least one
    for the pool); returns (pool, held_out), each sorted."""
    order = indices[torch.randperm(len(indices), generator=generator)]
    n_test = min(int(round(len(indices) * fraction)), len(indices) - 1)
    return order[n_test:].sort().values, order[:n_test].sort().values


class PoolSynthesizer(Synthesizer):
    """Base of triggers that replace a poisoned row's whole input with an image drawn from a
    pool chosen in `prepare`, labelled `target` (all-to-one only: a substituted image has
    no source label to shift).

    `backdoor_test_set()` returns the held-out inputs the backdoor is scored on. When the
    evaluation applies the trigger to them, rows that already are those inputs (same index
    in that set and same pixels) keep their pixels instead of being substituted.
    """

    def __init__(self, target: int = 8, label_mode: LabelMode = "all_to_one") -> None:
        if label_mode != "all_to_one":
            raise ValueError(f"label_mode must be all_to_one for input-substituting triggers, "
                             f"got {label_mode}")
        super().__init__(target, label_mode)
        self.pool: Tensor | None = None  # uint8 [P, C, H, W]
        self.held_out: ArrayDataset | None = None
        self._held_images: dict[str, Tensor] = {}  # held-out images per device

    def set_pool(self, pool: Tensor, held_out: ArrayDataset) -> None:
        if len(pool) == 0 or tuple(pool.shape[1:]) != tuple(self.input_shape):
            raise ConfigError(f"synthesizer {self.name}: the pool must hold images of shape "
                              f"{tuple(self.input_shape)}, got {tuple(pool.shape)}")
        self.pool, self.held_out, self._held_images = pool, held_out, {}

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.pool is None:
            raise RuntimeError(f"synthesizer {self.name}: call prepare(train, generator) before "
                               "applying it; it chooses the images that replace the inputs")
        pick = torch.randint(len(self.pool), (len(x),), generator=generator)
        return self.pool[pick].to(x.device).to(x.dtype) / 255.0

    def apply(self, batch: Batch, fraction: float = 1.0,
              generator: torch.Generator | None = None) -> Batch:
        out = super().apply(batch, fraction, generator)
        keep = self._held_out_rows(batch) & out.poisoned
        return out.with_(inputs=torch.where(keep[:, None, None, None], batch.inputs, out.inputs))

    def _held_out_rows(self, batch: Batch) -> Tensor:
        """Rows of `batch` that are backdoor test inputs: index k of the held-out set and the
        same pixels as its image k (so a training row never matches by index alone)."""
        if self.held_out is None or len(self.held_out) == 0:
            return torch.zeros(len(batch), dtype=torch.bool, device=batch.device)
        key = str(batch.device)
        if key not in self._held_images:
            self._held_images[key] = self.held_out.images.to(batch.device)
        images = self._held_images[key]
        idx = batch.indices
        valid = (idx >= 0) & (idx < len(images))
        same = (to_uint8(batch.inputs) == images[idx.clamp(0, len(images) - 1)]).flatten(1)
        return valid & same.all(1)

    def backdoor_test_set(self) -> ArrayDataset | None:
        return self.held_out
