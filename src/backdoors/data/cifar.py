"""CIFAR-10 from any of its usual layouts: python pickles, binary batches or an image folder."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from backdoors.data.dataset import ArrayDataset
from backdoors.data.download import download_file, safe_extract_tar
from backdoors.data.image_folder import list_classes, list_images
from backdoors.data.task import TASKS, Task
from backdoors.errors import DataError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

DEFAULT_DIR = Path(".data/cifar10")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
PICKLE_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
BINARY_FILES = [f"{name}.bin" for name in PICKLE_FILES]
_RECORD = 1 + 3 * 32 * 32  # binary format: one label byte, then 3072 pixel bytes (CHW)
_CACHE_VERSION = "1"  # bump when the cached tensors change meaning


# --- python pickles -------------------------------------------------------------------------

# Everything a pickled dict of numpy arrays needs; the files were written by Python 2 numpy,
# hence the old `numpy.core` module name. Any other global (os.system, ...) is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes and numpy arrays only, so a file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise DataError(f"cannot read CIFAR batch {path}: {exc}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch (expected a dict, got {type(batch)})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != _RECORD - 1 or not isinstance(labels, list)
            or len(labels) != len(data)):
        raise DataError(f"{path} is not a CIFAR-10 batch: expected 'data' uint8 [N, 3072] "
                        "and N 'labels'")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


# --- binary batches -------------------------------------------------------------------------

def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise DataError(f"{path} is not a CIFAR-10 binary batch: its size ({raw.size} bytes) "
                        f"is not a multiple of {_RECORD}")
    records = raw.reshape(-1, _RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _read_batches(folder: Path, kind: str) -> tuple[ArrayDataset, ArrayDataset]:
    """The five training batches concatenated in order, and the test batch."""
    names, read = ((PICKLE_FILES, _read_pickle_batch) if kind == "python"
                   else (BINARY_FILES, _read_binary_batch))
    parts = [read(folder / name) for name in names]
    images = np.concatenate([images for images, _ in parts[:-1]])
    labels = np.concatenate([labels for _, labels in parts[:-1]])
    return _dataset(images, labels, folder), _dataset(*parts[-1], folder)


def _dataset(images: np.ndarray, labels: np.ndarray, where: Path) -> ArrayDataset:
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise DataError(f"CIFAR-10 labels in {where} must be in 0..9")
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


# --- image folders --------------------------------------------------------------------------

def _decode_chunk(paths: list[str]) -> np.ndarray:
    """Decode 32x32 images into uint8 [n, 32, 32, 3] (runs in a pool worker)."""
    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from None
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
    if not paths:
        raise DataError(f"no .jpg/.jpeg/.png images under {split_dir}/<class>/")
    folder_id = hashlib.sha256(str(split_dir.resolve()).encode()).hexdigest()[:16]
    content = hashlib.sha256(_CACHE_VERSION.encode())
    for path in paths:
        st = os.stat(path)
        rel = "/".join(Path(path).parts[-2:])  # class/file: the same however split_dir is spelt
        content.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    cached = None if cache is None else (
        cache / f"cifar10-{folder_id}-{content.hexdigest()[:16]}.safetensors")
    if cached is not None and cached.is_file():
        try:
            tensors = load_file(cached)
            if tensors["images"].shape == (len(paths), 3, 32, 32):
                return ArrayDataset(tensors["images"], tensors["labels"])
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable cache: decode again and overwrite it
    images = torch.from_numpy(_decode_all(paths)).permute(0, 3, 1, 2).contiguous()
    dataset = ArrayDataset(images, torch.tensor(labels, dtype=torch.long))
    if cached is not None:
        _write_cache(cached, folder_id, {"images": dataset.images, "labels": dataset.labels})
    return dataset


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


def _read_split_folders(root: Path) -> tuple[ArrayDataset, ArrayDataset]:
    classes = list_classes(root / "train")
    if len(classes) != 10 or list_classes(root / "test") != classes:
        raise DataError(f"{root}/train and {root}/test must hold the same 10 class folders, "
                        f"found {len(classes)} in train: {', '.join(classes[:12])}")
    cache = _cache_dir(root)
    return (_read_image_folder(root / "train", classes, cache),
            _read_image_folder(root / "test", classes, cache))


# --- finding and loading --------------------------------------------------------------------

def _layouts(root: Path) -> list[tuple[str, Path]]:
    """Where each layout may sit under `root`, in order of preference (exact pixels first)."""
    return [("python", root / "cifar-10-batches-py"), ("python", root),
            ("binary", root / "cifar-10-batches-bin"), ("binary", root),
            ("folder", root), ("folder", root / "cifar10-jpg"), ("folder", root / "cifar10")]


def _present(kind: str, folder: Path) -> bool:
    if kind == "folder":
        return (folder / "train").is_dir() and (folder / "test").is_dir()
    names = PICKLE_FILES if kind == "python" else BINARY_FILES
    return all((folder / name).is_file() for name in names)


def load_cifar10(
    data_dir: str | Path | None = None, download: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from whichever CIFAR-10 layout `data_dir` (default `.data/cifar10`) holds."""
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DIR
    found = next(((k, f) for k, f in _layouts(root) if _present(k, f)), None)
    if found is None and download:
        archive = download_file([CIFAR_URL], root / "cifar-10-python.tar.gz", md5=CIFAR_MD5)
        safe_extract_tar(archive, root)
        found = ("python", root / "cifar-10-batches-py")
    if found is None:
        raise DataError(
            f"CIFAR-10 not found in {root}: looked for cifar-10-batches-py/ (data_batch_1..5, "
            "test_batch), cifar-10-batches-bin/ (*.bin) and {train,test}/<class>/ image "
            f"folders (also under cifar10-jpg/ or cifar10/); set download: true in the task "
            f"config or fetch {CIFAR_URL}"
        )
    kind, folder = found
    return _read_split_folders(folder) if kind == "folder" else _read_batches(folder, kind)


def extract_shared_cifar(tar_path: str | Path, cache_dir: str | Path) -> Path:
    """Extract an image-folder CIFAR-10 tarball into `cache_dir` once; return its root.

    Made for the project's `cifar10-jpg.tar.gz` (`cifar10-jpg/{train,test}/<class>/*.jpg`):
    the result is `cache_dir/cifar10-jpg`. Extraction goes to a temporary folder renamed
    into place at the end, so an interrupted run never leaves a half-filled root behind.
    """
    tar_path, cache_dir = Path(tar_path), Path(cache_dir)
    dest = cache_dir / tar_path.name.split(".")[0]
    if _present("folder", dest):
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=cache_dir))
    try:
        safe_extract_tar(tar_path, tmp)
        inner = [p for p in tmp.iterdir() if p.is_dir()]
        root = inner[0] if len(inner) == 1 and not _present("folder", tmp) else tmp
        if not _present("folder", root):
            raise DataError(f"{tar_path} holds no {{train,test}}/<class>/ image folder")
        if dest.exists() and not _present("folder", dest):
            shutil.rmtree(dest)  # something half-made by other means
        try:
            os.rename(root, dest)
        except OSError:
            if not _present("folder", dest):  # unless another process just finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@TASKS.register("cifar10")
class Cifar10Task(Task):
    """CIFAR-10 (Krizhevsky, 2009): 50,000 train / 10,000 test colour images, 3x32x32.

    Reads whichever layout `data_dir` (default `.data/cifar10`) holds: the python pickles
    (`cifar-10-batches-py/`, read with an unpickler that only rebuilds numpy arrays), the
    binary batches (`cifar-10-batches-bin/`), or an image folder `{train,test}/<class>/`
    (class folders sorted alphabetically give the labels; decoded once, then cached).
    With `download: true` the python version is fetched from the Toronto site and checked
    against its MD5. `resnet18` and random crop + flip augmentation by default.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    default_model = "resnet18"
    default_augment = True
    class_names = CLASS_NAMES

    def __init__(
        self,
        download: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.download = download

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        return load_cifar10(self.data_dir, self.download)
