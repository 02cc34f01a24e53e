"""Task: the data side of an experiment (classes, input shape, statistics, datasets)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from backdoors.data.augment import crop_flip
from backdoors.data.dataset import Dataset, take_first
from backdoors.data.loader import Augment
from backdoors.registry import Registry

TASKS: Registry[Task] = Registry("task")


class Task(ABC):
    """Base class. Subclasses set the class attributes and implement `_load`.

    Metadata (classes, shape, statistics) is known without touching the disk, so models
    and synthesizers are built and checked before any data loads; `train`/`test` load
    lazily on first use. `augment` defaults to the task's own choice (random crop and
    flip for natural images, nothing for digits), shifting images by up to `crop_padding`
    pixels (4; the fast CIFAR profile uses 2); `max_*_samples` keep the first N.
    """

    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 28, 28)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    default_model: str = "simple_net"
    default_augment: bool = False
    class_names: tuple[str, ...] | None = None
    # Loader processes decoding a streaming dataset (image folders); in-memory tasks: 0.
    num_workers: int = 0

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        augment: bool | None = None,
        crop_padding: int = 4,
    ) -> None:
        for key, value in (("max_train_samples", max_train_samples),
                           ("max_test_samples", max_test_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.augment = self.default_augment if augment is None else augment
        self.crop_padding = crop_padding
        self._data: tuple[Dataset, Dataset] | None = None

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    @abstractmethod
    def _load(self) -> tuple[Dataset, Dataset]:
        """Read (train, test) from disk or generate them."""

    def _loaded(self) -> tuple[Dataset, Dataset]:
        if self._data is None:
            train, test = self._load()
            self._data = (take_first(train, self.max_train_samples),
                          take_first(test, self.max_test_samples))
        return self._data

    def augmentation(self) -> Augment | None:
        """The training augmentation (random crop and flip), or None without `augment`."""
        return crop_flip(self.crop_padding) if self.augment else None

    @property
    def train(self) -> Dataset:
        return self._loaded()[0]

    @property
    def test(self) -> Dataset:
        return self._loaded()[1]


class DownloadableTask(Task):
    """A task read from an official distribution it can also fetch: with `download: true`
    and a network, a `data_dir` that lacks the files gets the official archive, checked
    against its published checksum, before anything is read (default: off, offline)."""

    def __init__(self, *, download: bool = False, **common: Any) -> None:
        super().__init__(**common)
        self.download = download
