"""Image files decoded once, in a pool of processes, then kept as uint8 tensors in a
safetensors file: the in-memory path for image datasets that ship as many small files
(CIFAR-10 as a folder, GTSRB, Tiny-ImageNet)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from backdoors.data.dataset import ArrayDataset
from backdoors.data.image_folder import image_error
from backdoors.errors import DataError

_CACHE_VERSION = "1"  # bump when the cached tensors change meaning
T = TypeVar("T")


def decode_rgb(paths: Sequence[str], size: int, dataset: str) -> np.ndarray:
    """Decode images that must already be `size`x`size` into uint8 [n, size, size, 3];
    greyscale or palette files are converted to RGB. Runs in a pool worker."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception as exc:  # PIL's decoders raise many types on corrupt files
            raise image_error(path, exc) from None
        if pixels.shape != (size, size, 3):
            raise DataError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, {dataset} needs "
                            f"{size}x{size}")
        out[i] = pixels
    return out


def decode_parallel(decode_chunk: Callable[[list[T]], np.ndarray], items: list[T],
                    shape: tuple[int, int, int], chunk: int = 2000) -> np.ndarray:
    """`decode_chunk` over chunks of `chunk` items, in parallel on Linux; uint8 [N, *shape].

    PIL's per-file cost dominates. Forked workers start at once without re-importing torch
    (torch's DataLoader forks on Linux too); elsewhere fork is unsafe and spawn would
    re-import torch per worker, so decoding stays serial there, which is acceptable because
    the result is cached. `decode_chunk` must pickle (a module-level function or a
    functools.partial of one).
    """
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    # sched_getaffinity exists on Linux only, and counts the CPUs this process may use.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = min(len(chunks), cpus)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(decode_chunk, chunks)
    else:
        parts = [decode_chunk(c) for c in chunks]
    return np.concatenate(parts) if parts else np.empty((0, *shape), np.uint8)


def cache_dir(root: Path) -> Path | None:
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


def cached_images(*, prefix: str, folder: Path, files: Sequence[str], labels: Sequence[int],
                  shape: tuple[int, int, int], decode: Callable[[], np.ndarray],
                  cache: Path | None, options: str = "") -> ArrayDataset:
    """The dataset `decode()` gives (uint8 [N, H, W, C] for `labels`; `shape` is one
    image's [C, H, W]), from the cache when
    an intact entry matches, else decoded now and cached as `prefix-<id>-<key>.safetensors`.

    The key covers `folder`'s absolute path, `options` (e.g. the output size) and every
    file in `files` (name, size, mtime: images and the annotation files that place or
    label them), so adding, removing or editing one invalidates the entry; entries for
    other `options` of the same folder are kept. Files are safetensors, never pickles.
    """
    # surrogateescape: file names that are not valid UTF-8 still hash (valid ones unchanged).
    folder_id = hashlib.sha256(_utf8(str(folder.resolve()) + options)).hexdigest()[:16]
    content = hashlib.sha256(_CACHE_VERSION.encode())
    for path in files:
        try:
            st = os.stat(path)
        except OSError as exc:  # a file listed in an annotation file may be missing
            raise image_error(path, exc) from None
        rel = "/".join(Path(path).parts[-2:])  # parent/file: the same however folder is spelt
        content.update(_utf8(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n"))
    cached = None if cache is None else (
        cache / f"{prefix}-{folder_id}-{content.hexdigest()[:16]}.safetensors")
    label_tensor = torch.tensor(labels, dtype=torch.long)
    if cached is not None and cached.is_file():
        hit = _read_cache(cached, label_tensor, shape)
        if hit is not None:
            return hit
    images = torch.from_numpy(decode()).permute(0, 3, 1, 2).contiguous()
    dataset = ArrayDataset(images, label_tensor)
    if cached is not None:
        _write_cache(cached, f"{prefix}-{folder_id}",
                     {"images": dataset.images, "labels": dataset.labels})
    return dataset


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _read_cache(cached: Path, labels: torch.Tensor,
                shape: tuple[int, int, int]) -> ArrayDataset | None:
    """The cached dataset when the file is intact and matches the labels and image shape,
    else None.

    A truncated, corrupt or tampered cache only costs a fresh decode (which overwrites it),
    so it is never an error. safetensors holds raw tensors: nothing is unpickled.
    """
    try:
        tensors = load_file(cached)
    except Exception:  # corrupt headers raise SafetensorError, OSError or ValueError
        return None
    images, cached_labels = tensors.get("images"), tensors.get("labels")
    if (images is None or cached_labels is None or images.dtype != torch.uint8
            or tuple(images.shape) != (len(labels), *shape)
            or cached_labels.dtype != torch.long or not torch.equal(cached_labels, labels)):
        return None
    return ArrayDataset(images, cached_labels)


def _write_cache(cached: Path, stem: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically and drop stale entries with the same `stem` (folder and options),
    so the cache stays small."""
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        for old in cached.parent.glob(f"{stem}-*.safetensors"):
            old.unlink(missing_ok=True)
        save_file(tensors, str(tmp))
        os.replace(tmp, cached)
    except (OSError, SafetensorError):
        pass  # caching is an optimisation; a full or read-only disk must not fail the load
    finally:
        tmp.unlink(missing_ok=True)
