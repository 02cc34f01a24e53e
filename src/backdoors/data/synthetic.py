"""A tiny generated task for tests and demos: no files, learnable in seconds."""

from __future__ import annotations

from typing import Any

import torch

from backdoors.data.dataset import ArrayDataset
from backdoors.data.task import TASKS, Task


@TASKS.register("synthetic")
class SyntheticTask(Task):
    """Generated 1x16x16 images: each class is a soft blob at its own place, plus noise.

    Deterministic for a given `seed`; `train_size`/`test_size` samples; 4 classes by
    default. The blobs stay out of the top-right corner, where triggers go.
    """

    input_shape = (1, 16, 16)
    mean = (0.2,)
    std = (0.25,)
    default_model = "tiny_cnn"

    def __init__(
        self,
        num_classes: int = 4,
        train_size: int = 1024,
        test_size: int = 512,
        noise: float = 0.15,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not 2 <= num_classes <= 8:
            raise ValueError(f"num_classes must be in 2..8, got {num_classes}")
        self.num_classes = num_classes
        self.train_size, self.test_size = train_size, test_size
        self.noise, self.seed = noise, seed

    def _make(self, n: int, g: torch.Generator) -> ArrayDataset:
        labels = torch.randint(0, self.num_classes, (n,), generator=g)
        # Blob centres spread over the lower and left part of the canvas.
        angles = torch.arange(self.num_classes) * (2 * torch.pi / self.num_classes)
        cy, cx = 9.5 + 4.0 * torch.sin(angles), 7.0 + 4.0 * torch.cos(angles)
        jitter = torch.randn(n, 2, generator=g) * 0.8
        yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        dy = yy[None] - (cy[labels] + jitter[:, 0])[:, None, None]
        dx = xx[None] - (cx[labels] + jitter[:, 1])[:, None, None]
        img = torch.exp(-(dy**2 + dx**2) / (2 * 2.0**2))
        img = img + self.noise * torch.randn(img.shape, generator=g)
        images = (img.clamp(0, 1) * 255).round().to(torch.uint8)[:, None]
        return ArrayDataset(images, labels)

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        g = torch.Generator().manual_seed(self.seed)
        return self._make(self.train_size, g), self._make(self.test_size, g)
