"""Image folders in the ImageNet layout (`split/<class>/<image>`), streamed from disk."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from backdoors.data.checks import reason, require_folder, scan
from backdoors.data.task import TASKS, Task
from backdoors.errors import DataError, did_you_mean

DEFAULT_DIR = Path(".data/imagenet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_classes(split_dir: Path) -> list[str]:
    """Sorted names of the sub-folders of `split_dir` (hidden ones skipped): the class list."""
    return sorted(e.name for e in scan(split_dir) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Sorted paths of the image files in `folder` (none when it does not exist)."""
    if not folder.is_dir():
        return []
    try:
        return sorted(e.path for e in scan(folder)
                      if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
    except OSError as exc:  # is_file() stats symlinks, which can fail on their target
        raise DataError(f"cannot list folder {folder}: {reason(exc)}") from None


def list_images(split_dir: Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Paths of the images in `split_dir/<class>/` and their labels (index into `classes`).

    Names are sorted within a class, then the classes are interleaved (first image of every
    class, then the second, ...): `max_*_samples` keeps a prefix, and a class-by-class order
    would make that prefix a few classes only. A class folder may be missing (empty split).
    """
    per_class = [_image_files(Path(split_dir) / name) for name in classes]
    paths, labels = [], []
    for row in itertools.zip_longest(*per_class):
        for label, path in enumerate(row):
            if path is not None:
                paths.append(path)
                labels.append(label)
    return paths, labels


def require_images(split_dir: Path, classes: Sequence[str], labels: Sequence[int],
                   every_class: bool) -> None:
    """DataError naming the folder when `split_dir` has no images, or (with `every_class`)
    when a class folder has none: a class never seen in training is a broken dataset."""
    present = set(labels)
    if not present:
        raise DataError(f"no .jpg/.jpeg/.png images under {split_dir}/<class>/ (looked in "
                        f"{len(classes)} class folders); expected at least one image")
    empty = [name for i, name in enumerate(classes) if i not in present]
    if every_class and empty:
        folder = Path(split_dir) / empty[0]
        others = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise DataError(f"{folder}{others} {_contents(folder)}; expected "
                        f"{split_dir}/<class>/ folders holding .jpg/.jpeg/.png images")


def _contents(folder: Path) -> str:
    """What an image-less class folder holds instead, e.g. images in another format."""
    if not folder.is_dir():
        return "is missing"
    names = sorted(e.name for e in scan(folder))
    if not names:
        return "is empty"
    entries = f"{len(names)} other entr{'y' if len(names) == 1 else 'ies'}"
    return f"holds no .jpg/.jpeg/.png images ({entries}, e.g. '{names[0]}')"


def resize_center_crop(image: Image.Image, resize: int, size: int) -> Image.Image:
    """Scale the shorter side to `resize` (bilinear, antialiased), then crop the centre square.

    Same arithmetic as torchvision's Resize(resize) + CenterCrop(size) on PIL images, so
    numbers stay comparable with published ImageNet pipelines.
    """
    w, h = image.size
    new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    if new != image.size:
        image = image.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class ImageFolderDataset:
    """A StreamingDataset over image files: decode, resize, centre-crop, scale to [0, 1].

    Holds only paths and labels, so it pickles cheaply into DataLoader worker processes.
    """

    def __init__(self, paths: list[str], labels: list[int], resize: int, image_size: int) -> None:
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.resize, self.image_size = resize, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        x = load_image(self.paths[index], self.resize, self.image_size)
        return x, int(self.labels[index]), -1


def load_image(path: str, resize: int, image_size: int,
               box: tuple[int, int, int, int] | None = None) -> Tensor:
    """Decode an image as RGB, optionally crop `box` (PIL pads past the border with black),
    resize the shorter side to `resize`, centre-crop `image_size`; float [3, H, W] in [0, 1].
    """
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if box is not None:
                rgb = rgb.crop(box)
        pixels = np.array(resize_center_crop(rgb, resize, image_size))
    except Exception as exc:  # PIL's decoders raise many types (OSError, SyntaxError, ...)
        raise image_error(path, exc) from None
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)


def image_error(path: str, exc: Exception) -> DataError:
    """A missing or unreadable file (an OS error with its own text) or one PIL cannot decode."""
    if isinstance(exc, OSError) and exc.strerror:
        return DataError(f"cannot read image {path}: {exc.strerror}; expected a readable file")
    return DataError(f"cannot decode image {path}: {reason(exc)}; expected an intact "
                     ".jpg/.jpeg/.png image")


@TASKS.register("image_folder")
class ImageFolderTask(Task):
    """Any image folder in the ImageNet layout (e.g. ImageNet-1k), streamed from disk.

    `data_dir` (default `.data/imagenet`) holds `train/<class>/*.jpg|jpeg|png` and
    `val/<class>/...` (or `test/`); class folders sorted alphabetically give the labels.
    Images get the standard ImageNet evaluation preprocessing (shorter side to `resize`,
    default 256, centre crop `image_size`, default 224) and are decoded by `num_workers`
    loader processes. ImageNet mean/std, `resnet18_imagenet` and augmentation by default.
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    default_model = "resnet18_imagenet"
    default_augment = True

    def __init__(
        self,
        image_size: int = 224,
        resize: int = 256,
        num_workers: int = 2,
        num_classes: int | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if image_size < 1 or resize < image_size:
            raise ValueError(f"need 1 <= image_size <= resize, got {image_size} and {resize}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.image_size, self.resize, self.num_workers = image_size, resize, num_workers
        self.root = self.data_dir or DEFAULT_DIR
        self.input_shape = (3, image_size, image_size)
        self.class_names: tuple[str, ...] | None = None
        if num_classes is not None:
            # Known up front (e.g. 1000 for ImageNet): configs validate without the data,
            # and the folder is checked against it when it loads.
            if num_classes < 2:
                raise ValueError(f"num_classes must be >= 2, got {num_classes}")
            self.num_classes = num_classes
        else:
            self._scan()

    def _scan(self) -> None:
        """Find train/ and val/ (or test/) and list the class folders (cheap)."""
        root = self.root
        require_folder(root, "train/<class>/ and val/<class>/ (or test/) image folders")
        self.train_dir = root / "train"
        test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
        if not self.train_dir.is_dir() or test_dir is None:
            raise DataError(f"image folder not found: expected {root}/train/<class>/ and "
                            f"{root}/val/<class>/ (or test/) holding .jpg/.jpeg/.png images")
        self.test_dir: Path = test_dir
        classes = tuple(list_classes(self.train_dir))
        if not classes:
            raise DataError(f"no class folders in {self.train_dir}: expected train/<class>/*.jpg")
        if "num_classes" in vars(self) and len(classes) != self.num_classes:
            raise DataError(f"{self.train_dir} has {len(classes)} class folders but the task "
                            f"says num_classes: {self.num_classes}")
        self.class_names = classes
        self.num_classes = len(classes)

    def _split(self, split_dir: Path) -> ImageFolderDataset:
        unknown = sorted(set(list_classes(split_dir)) - set(self.class_names))
        if unknown:
            raise DataError(f"{split_dir} has class folders missing from {self.train_dir}: "
                            f"{', '.join(unknown[:5])}"
                            f"{did_you_mean(unknown[0], self.class_names)}")
        paths, labels = list_images(split_dir, self.class_names)
        # Every class needs training images; a test split may leave some classes out.
        require_images(split_dir, self.class_names, labels, split_dir == self.train_dir)
        return ImageFolderDataset(paths, labels, self.resize, self.image_size)

    def _load(self) -> tuple[ImageFolderDataset, ImageFolderDataset]:
        if self.class_names is None:
            self._scan()
        return self._split(self.train_dir), self._split(self.test_dir)
