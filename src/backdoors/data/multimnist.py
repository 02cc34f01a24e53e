"""MultiMNIST: two MNIST digits side by side read as one two-digit number (100 classes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backdoors.data.dataset import ArrayDataset
from backdoors.data.mnist import load_mnist
from backdoors.data.task import TASKS, DownloadableTask


def compose_pairs(left: torch.Tensor, right: torch.Tensor, overlap: int = 8,
                  chunk: int = 8192) -> torch.Tensor:
    """Put uint8 digits [N, 1, 28, 28] side by side and shrink the pair back to 28x28.

    The right digit starts `overlap` pixels before the left one ends (canvas width
    56 - overlap); where they overlap the brighter pixel wins. The canvas is resized with
    antialiased bilinear interpolation, in chunks of `chunk` to bound memory.
    """
    n, _, h, w = left.shape
    if not 0 <= overlap < w:
        raise ValueError(f"overlap must be in 0..{w - 1}, got {overlap}")
    out = torch.empty((n, 1, h, w), dtype=torch.uint8)
    for start in range(0, n, chunk):
        a, b = left[start : start + chunk], right[start : start + chunk]
        canvas = torch.zeros((len(a), 1, h, 2 * w - overlap), dtype=torch.uint8)
        canvas[..., :w] = a
        canvas[..., w - overlap :] = torch.maximum(canvas[..., w - overlap :], b)
        small = F.interpolate(canvas.float(), size=(h, w), mode="bilinear",
                              align_corners=False, antialias=True)
        out[start : start + chunk] = small.round().clamp(0, 255).to(torch.uint8)
    return out


def make_pairs(
    digits: ArrayDataset, size: int, overlap: int = 8, seed: int = 0, stream: int = 0
) -> ArrayDataset:
    """`size` random (left, right) pairs of `digits`, drawn with replacement.

    Deterministic for (`seed`, `stream`); label = 10 * left + right; aux holds the two
    digits, [size, 2].
    """
    rng = np.random.default_rng([seed, stream])
    idx = torch.from_numpy(rng.integers(0, len(digits), size=(2, size)))
    images = compose_pairs(digits.images[idx[0]], digits.images[idx[1]], overlap)
    aux = torch.stack([digits.labels[idx[0]], digits.labels[idx[1]]], dim=1)
    return ArrayDataset(images, 10 * aux[:, 0] + aux[:, 1], aux)


@TASKS.register("multimnist")
class MultiMnistTask(DownloadableTask):
    """MultiMNIST as in Blind Backdoors (Bagdasaryan & Shmatikov, arXiv 2005.03823): 100 classes.

    Each image pairs two MNIST digits, placed side by side with `overlap` pixels of overlap
    (default 8: a 28x48 canvas, brighter pixel wins) and resized to 28x28; the label is the
    two-digit number 10 * left + right, and aux holds both digits (the calculator backdoor
    needs them). `train_size` pairs (default 60,000) come from MNIST's train split and
    `test_size` (default 10,000) from its test split, drawn with replacement, deterministic
    for a given `seed`. MNIST is read as by the `mnist` task (`data_dir`, `download`).
    """

    num_classes = 100
    input_shape = (1, 28, 28)
    # Measured on 60,000 pairs (overlap 8) of the official MNIST test images.
    mean = (0.1546,)
    std = (0.3038,)
    default_model = "simple_net"
    default_augment = False

    def __init__(
        self,
        train_size: int = 60000,
        test_size: int = 10000,
        overlap: int = 8,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if train_size < 1 or test_size < 1:
            raise ValueError(f"train_size and test_size must be >= 1, got {train_size}, "
                             f"{test_size}")
        if not 0 <= overlap < 28:
            raise ValueError(f"overlap must be in 0..27, got {overlap}")
        self.train_size, self.test_size = train_size, test_size
        self.overlap, self.seed = overlap, seed

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        train, test = load_mnist(self.data_dir, self.download)
        # Separate seed streams per split, so test pairs do not depend on train_size.
        return (make_pairs(train, self.train_size, self.overlap, self.seed, stream=0),
                make_pairs(test, self.test_size, self.overlap, self.seed, stream=1))
