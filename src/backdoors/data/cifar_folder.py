"""CIFAR-10 as an image folder ({train,test}/<class>/*.jpg|png): decoded once in a pool of
processes, then cached as uint8 tensors (safetensors) next to the images."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from backdoors.data.dataset import ArrayDataset
from backdoors.data.image_cache import cache_dir, cached_images, decode_parallel, decode_rgb
from backdoors.data.image_folder import list_classes, list_images, require_images
from backdoors.errors import DataError, did_you_mean


def _decode_all(paths: list[str]) -> np.ndarray:
    """Decode 32x32 images into uint8 [n, 32, 32, 3], in parallel where possible."""
    return decode_parallel(partial(decode_rgb, size=32, dataset="CIFAR-10"), paths, (32, 32, 3))


def _read_image_folder(split_dir: Path, classes: list[str], cache: Path | None) -> ArrayDataset:
    """Decode `split_dir/<class>/*` once; later loads read the cached tensors (the key
    covers every file's name, size and mtime, so any change to the folder invalidates it)."""
    paths, labels = list_images(split_dir, classes)
    require_images(split_dir, classes, labels, every_class=True)
    return cached_images(prefix="cifar10", folder=split_dir, files=paths, labels=labels,
                         shape=(3, 32, 32), decode=lambda: _decode_all(paths), cache=cache)


def read_split_folders(root: Path) -> tuple[ArrayDataset, ArrayDataset]:
    classes, test_classes = list_classes(root / "train"), list_classes(root / "test")
    if len(classes) != 10:
        raise DataError(f"{root}/train and {root}/test must hold the same 10 class folders, "
                        f"found {len(classes)} in train: {', '.join(classes[:12]) or 'none'}")
    if test_classes != classes:
        extra = sorted(set(test_classes) - set(classes))
        missing = sorted(set(classes) - set(test_classes))
        what = (f"has class folder '{extra[0]}' that train/ lacks"
                f"{did_you_mean(extra[0], missing or classes)}" if extra
                else f"lacks class folder '{missing[0]}'")
        raise DataError(f"{root}/test {what}; {root}/train and {root}/test must hold the same "
                        "10 class folders")
    cache = cache_dir(root)
    return (_read_image_folder(root / "train", classes, cache),
            _read_image_folder(root / "test", classes, cache))
