"""scikit-learn's bundled 8x8 handwritten digits: real data that needs no download."""

from __future__ import annotations

from typing import Any

import torch

from backdoors.data.dataset import ArrayDataset
from backdoors.data.task import TASKS, Task
from backdoors.errors import DataError


@TASKS.register("digits")
class DigitsTask(Task):
    """UCI optical digits as shipped inside scikit-learn (1,797 images, 8x8, 17 grey levels).

    Split with a fixed seed: `test_fraction` (default 0.25) of the images go to the
    test set, stratified by class. Offline everywhere scikit-learn is installed.
    """

    input_shape = (1, 8, 8)
    mean = (0.305,)
    std = (0.38,)
    default_model = "tiny_cnn"

    def __init__(
        self,
        test_fraction: float = 0.25,
        split_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction, self.split_seed = test_fraction, split_seed

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError("the digits task reads the copy bundled with scikit-learn, which is "
                            "not installed; expected `pip install scikit-learn`") from None

        raw = load_digits()
        images = torch.from_numpy(raw.images).float().div(16.0).mul(255).round()
        images = images.to(torch.uint8)[:, None]
        labels = torch.from_numpy(raw.target).long()
        g = torch.Generator().manual_seed(self.split_seed)
        test_mask = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(10):
            rows = (labels == c).nonzero().flatten()
            rows = rows[torch.randperm(len(rows), generator=g)]
            test_mask[rows[: round(len(rows) * self.test_fraction)]] = True
        train = ArrayDataset(images[~test_mask], labels[~test_mask])
        return train, ArrayDataset(images[test_mask], labels[test_mask])
