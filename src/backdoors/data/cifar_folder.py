"""CIFAR-10 as an image folder ({train,test}/<class>/*.jpg|png): decoded once in a pool of
processes, then cached as uint8 tensors (safetensors) next to the images."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from backdoors.data.dataset import ArrayDataset
from backdoors.data.image_folder import image_error, list_classes, list_images, require_images
from backdoors.errors import DataError, did_you_mean

_CACHE_VERSION = "1"  # bump when the cached tensors change meaning


def _decode_chunk(paths: list[str]) -> np.ndarray:
    """Decode 32x32 images into uint8 [n, 32, 32, 3] (runs in a pool worker)."""
    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception as exc:  # PIL's decoders raise many types on corrupt files
            raise image_error(path, exc) from None
        if pixels.shape != (32, 32, 3):
            raise DataError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, CIFAR-10 needs 32x32")
        out[i] = pixels
    return out


def _decode_all(paths: list[str], chunk: int = 2000) -> np.ndarray:
    """Decode in chunks of `chunk` files, in parallel on Linux (PIL's per-file cost dominates).

    Forked workers start at once without re-importing torch (torch's DataLoader forks on
    Linux too); elsewhere fork is unsafe and spawn would re-import torch per worker, so
    decoding stays serial there, which is acceptable because the result is cached.
    """
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    # sched_getaffinity exists on Linux only, and counts the CPUs this process may use.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = min(len(chunks), cpus)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_decode_chunk, chunks)
    else:
        parts = [_decode_chunk(c) for c in chunks]
    return np.concatenate(parts) if parts else np.empty((0, 32, 32, 3), np.uint8)


def _cache_dir(root: Path) -> Path | None:
    """`root/.backdoors-cache` when writable, else `~/.cache/backdoors`, else None (no cache)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    for folder in (root / ".backdoors-cache", xdg / "backdoors"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    return None


def _read_image_folder(split_dir: Path, classes: list[str], cache: Path | None) -> ArrayDataset:
    """Decode `split_dir/<class>/*` once; later loads read the cached tensors.

    The cache key covers the folder's absolute path and every file's name, size and mtime,
    so adding, removing or editing an image invalidates it. Files are safetensors, never
    pickles.
    """
    paths, labels = list_images(split_dir, classes)
    require_images(split_dir, classes, labels, every_class=True)
    # surrogateescape: file names that are not valid UTF-8 still hash (valid ones unchanged).
    folder_id = hashlib.sha256(_utf8(str(split_dir.resolve()))).hexdigest()[:16]
    content = hashlib.sha256(_CACHE_VERSION.encode())
    for path in paths:
        st = os.stat(path)
        rel = "/".join(Path(path).parts[-2:])  # class/file: the same however split_dir is spelt
        content.update(_utf8(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n"))
    cached = None if cache is None else (
        cache / f"cifar10-{folder_id}-{content.hexdigest()[:16]}.safetensors")
    label_tensor = torch.tensor(labels, dtype=torch.long)
    if cached is not None and cached.is_file():
        hit = _read_cache(cached, label_tensor)
        if hit is not None:
            return hit
    images = torch.from_numpy(_decode_all(paths)).permute(0, 3, 1, 2).contiguous()
    dataset = ArrayDataset(images, label_tensor)
    if cached is not None:
        _write_cache(cached, folder_id, {"images": dataset.images, "labels": dataset.labels})
    return dataset


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _read_cache(cached: Path, labels: torch.Tensor) -> ArrayDataset | None:
    """The cached dataset when the file is intact and matches the folder, else None.

    A truncated, corrupt or tampered cache only costs a fresh decode (which overwrites it),
    so it is never an error. safetensors holds raw tensors: nothing is unpickled.
    """
    try:
        tensors = load_file(cached)
    except Exception:  # corrupt headers raise SafetensorError, OSError or ValueError
        return None
    images, cached_labels = tensors.get("images"), tensors.get("labels")
    if (images is None or cached_labels is None or images.dtype != torch.uint8
            or tuple(images.shape) != (len(labels), 3, 32, 32)
            or cached_labels.dtype != torch.long or not torch.equal(cached_labels, labels)):
        return None
    return ArrayDataset(images, cached_labels)


def _write_cache(cached: Path, folder_id: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically and drop stale entries for the same folder, so the cache stays small."""
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        for old in cached.parent.glob(f"cifar10-{folder_id}-*.safetensors"):
            old.unlink(missing_ok=True)
        save_file(tensors, str(tmp))
        os.replace(tmp, cached)
    except (OSError, SafetensorError):
        pass  # caching is an optimisation; a full or read-only disk must not fail the load
    finally:
        tmp.unlink(missing_ok=True)


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
    cache = _cache_dir(root)
    return (_read_image_folder(root / "train", classes, cache),
            _read_image_folder(root / "test", classes, cache))
