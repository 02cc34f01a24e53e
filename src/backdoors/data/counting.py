"""Counting: canvases holding 1..5 MNIST digits; the label is how many, aux says who is there.

A small, offline stand-in for the PIPA people-counting task of Blind Backdoors: digits
play the people, and a few chosen digits play the target identities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.data.dataset import ArrayDataset
from backdoors.data.mnist import load_mnist
from backdoors.data.task import TASKS, DownloadableTask


def identity_labels(present: Tensor, identities: Sequence[int]) -> Tensor:
    """Aux label per row of `present` ([N, k] digit classes, -1 for empty slots): 1 + the
    position in `identities` of the **last listed** identity that appears, 0 when none
    does. Last-listed-wins is Backdoors 101's rule for PIPA photos with several targets."""
    aux = torch.zeros(len(present), dtype=torch.long)
    for pos, identity in enumerate(identities):
        aux = torch.where((present == identity).any(1), pos + 1, aux)
    return aux


def shrink(images: Tensor, size: int, chunk: int = 8192) -> Tensor:
    """uint8 [N, 1, h, w] -> [N, 1, size, size], bilinear with antialiasing."""
    out = [F.interpolate(images[s : s + chunk].float(), size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True).round().clamp(0, 255)
           for s in range(0, len(images), chunk)]
    return torch.cat(out).to(torch.uint8)


def make_canvases(
    digits: ArrayDataset,
    size: int,
    canvas: int = 48,
    digit_size: int = 16,
    max_count: int = 5,
    jitter: int = 2,
    seed: int = 0,
    stream: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """`size` canvases of 1..max_count digits (uniform count), deterministic for
    (`seed`, `stream`); returns (uint8 images [size, 1, canvas, canvas], counts [size],
    digit classes per slot [size, max_count], -1 for empty slots).

    The canvas is a grid of digit_size cells; each digit takes a distinct random cell,
    shifted by up to `jitter` pixels, so neighbours overlap by at most 2 * jitter pixels
    (the brighter pixel wins).
    """
    grid = canvas // digit_size
    margin = (canvas - grid * digit_size) // 2
    rng = np.random.default_rng([seed, stream])
    counts = torch.from_numpy(rng.integers(1, max_count + 1, size))
    cells = torch.from_numpy(np.argsort(rng.random((size, grid * grid)), axis=1)[:, :max_count])
    picks = torch.from_numpy(rng.integers(0, len(digits), (size, max_count)))
    shift = torch.from_numpy(rng.integers(-jitter, jitter + 1, (size, max_count, 2)))
    top = (margin + (cells // grid) * digit_size + shift[..., 0]).clamp(0, canvas - digit_size)
    left = (margin + (cells % grid) * digit_size + shift[..., 1]).clamp(0, canvas - digit_size)
    small = shrink(digits.images, digit_size)[:, 0]
    images = torch.zeros((size, canvas, canvas), dtype=torch.uint8)
    span = torch.arange(digit_size)
    for slot in range(max_count):
        live = (counts > slot).nonzero().flatten()
        rows = (top[live, slot, None] + span)[:, :, None]  # [L, d, 1]
        cols = (left[live, slot, None] + span)[:, None, :]  # [L, 1, d]
        at = (live[:, None, None], rows, cols)
        images[at] = torch.maximum(images[at], small[picks[live, slot]])
    slots = torch.arange(max_count)[None, :] < counts[:, None]
    present = torch.where(slots, digits.labels[picks], -1)
    return images[:, None], counts, present


@TASKS.register("counting")
class CountingTask(DownloadableTask):
    """Digit counting with identities: an offline stand-in for Blind Backdoors' PIPA task.

    Blind Backdoors (Bagdasaryan & Shmatikov, arXiv 2005.03823) uses a complex backdoor
    to switch a counting model to identifying who is in the picture.

    Each 1 x `canvas` x `canvas` image (default 48) holds 1..`max_count` (default 5) MNIST
    digits shrunk to `digit_size` (default 16) pixels, each in its own cell of a grid,
    shifted by up to `jitter` (default 2) pixels. Label = count - 1 (`max_count` classes).
    Aux = identity: 1 + the position in `identities` (default [0, 7]) of the last listed
    identity digit on the canvas, 0 when none is ("no target"). `train_size` canvases
    (default 60,000) are built from MNIST's train digits and `test_size` (10,000) from its
    test digits, deterministic for `seed`. MNIST is read as by the `mnist` task.
    """

    num_classes = 5
    input_shape = (1, 48, 48)
    # Measured on 60,000 default canvases of the official MNIST test digits.
    mean = (0.0442,)
    std = (0.1657,)
    default_model = "simple_net"
    default_augment = False

    def __init__(
        self,
        train_size: int = 60000,
        test_size: int = 10000,
        canvas: int = 48,
        digit_size: int = 16,
        max_count: int = 5,
        identities: list[int] | None = None,
        jitter: int = 2,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        idents = [0, 7] if identities is None else list(identities)
        if train_size < 1 or test_size < 1:
            raise ValueError(f"train_size and test_size must be >= 1, got {train_size}, "
                             f"{test_size}")
        if not 4 <= digit_size <= canvas:
            raise ValueError(f"need 4 <= digit_size <= canvas, got {digit_size}, {canvas}")
        cells = (canvas // digit_size) ** 2
        if not 2 <= max_count <= cells:
            raise ValueError(f"max_count must be in 2..{cells} (grid cells of a {canvas}px "
                             f"canvas with {digit_size}px digits), got {max_count}")
        if len(set(idents)) != len(idents) or not all(0 <= d <= 9 for d in idents):
            raise ValueError(f"identities must be distinct digits 0..9, got {identities}")
        if not 1 <= len(idents) < max_count:
            raise ValueError(f"need 1..{max_count - 1} identities (aux labels must be classes), "
                             f"got {len(idents)}")
        if not 0 <= jitter <= digit_size // 2:
            raise ValueError(f"jitter must be in 0..{digit_size // 2}, got {jitter}")
        self.num_classes = max_count
        self.input_shape = (1, canvas, canvas)
        self.train_size, self.test_size = train_size, test_size
        self.canvas, self.digit_size, self.max_count = canvas, digit_size, max_count
        self.identities, self.jitter = idents, jitter
        self.seed = seed

    def _build(self, digits: ArrayDataset, size: int, stream: int) -> ArrayDataset:
        images, counts, present = make_canvases(
            digits, size, self.canvas, self.digit_size, self.max_count, self.jitter,
            self.seed, stream)
        return ArrayDataset(images, counts - 1, identity_labels(present, self.identities))

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        train, test = load_mnist(self.data_dir, self.download)
        # Separate streams per split, so test canvases do not depend on train_size.
        return self._build(train, self.train_size, 0), self._build(test, self.test_size, 1)
