"""CIFAR-10's own batch files: python pickles (read through a restricted unpickler that
builds numpy arrays and nothing else) and binary records, with one-line errors naming the
batch at fault."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backdoors.data.checks import reason
from backdoors.data.dataset import ArrayDataset
from backdoors.errors import DataError, did_you_mean

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

PICKLE_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
BINARY_FILES = [f"{name}.bin" for name in PICKLE_FILES]
_RECORD = 1 + 3 * 32 * 32  # binary format: one label byte, then 3072 pixel bytes (CHW)
_CIFAR10_BATCH = "a CIFAR-10 batch with 'data' and 'labels'"


# Everything a pickled dict of numpy arrays needs; the files were written by Python 2 numpy,
# hence the old `numpy.core` module name. Any other global (os.system, ...) is refused.
_ALLOWED_GLOBALS = {
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"),
    # which only turns a string into bytes (torch's weights_only loader allows it too).
    ("_codecs", "encode"): codecs.encode,
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


def load_array_pickle(path: Path, kind: str = "CIFAR-10 batch",
                      keys: str = "'data' and 'labels'") -> dict[str, Any]:
    """A pickled dict of numpy arrays, lists and bytes (the CIFAR python files), read
    through the restricted unpickler, with str keys; `kind` and `keys` say what the file
    should be in the one-line DataError when it is not."""
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise DataError(f"cannot read CIFAR batch {path}: {reason(exc)}; expected a pickled "
                        f"{kind}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a {kind}: expected a dict with {keys}, got "
                        f"{type(batch).__name__}")
    # Python 2 wrote the keys as byte strings; latin-1 decodes any bytes (ASCII unchanged).
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in batch.items()}


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = load_array_pickle(path)
    data = pickled_data(batch, path)
    return data.reshape(-1, 3, 32, 32), checked_labels(batch, len(data), path)


def _missing_key(batch: dict[str, Any], key: str, path: Path,
                 expected: str = _CIFAR10_BATCH) -> DataError:
    keys = ", ".join(sorted(batch)[:8]) or "none"
    if key == "labels" and "fine_labels" in batch:
        return DataError(f"{path} looks like a CIFAR-100 batch ('fine_labels'); expected "
                         "CIFAR-10's 'labels'")
    near = next((f"; found '{k}'{h}" for k in sorted(batch) if (h := did_you_mean(k, [key]))),
                "")
    return DataError(f"{path} has no '{key}' entry (keys: {keys}){near}; expected {expected}")


def pickled_data(batch: dict[str, Any], path: Path,
                 expected: str = _CIFAR10_BATCH) -> np.ndarray:
    """The batch's 'data': uint8 [N, 3072] with N >= 1, else a DataError naming the file."""
    data = batch.get("data")
    if data is None:
        raise _missing_key(batch, "data", path, expected)
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != _RECORD - 1):
        got = (f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise DataError(f"{path}: 'data' is {got}; expected uint8 [N, 3072]")
    if not len(data):
        raise DataError(f"{path} holds no images; expected 'data' uint8 [N, 3072] with N >= 1")
    return data


def checked_labels(batch: dict[str, Any], n: int, path: Path, key: str = "labels",
                   num_classes: int = 10, expected: str = _CIFAR10_BATCH) -> np.ndarray:
    """The batch's `key` entry as int64 [n] in 0..num_classes-1, else a DataError saying
    what is wrong."""
    top = num_classes - 1
    labels = batch.get(key)
    if labels is None:
        raise _missing_key(batch, key, path, expected)
    if not isinstance(labels, list | tuple | np.ndarray):
        raise DataError(f"{path}: '{key}' is {type(labels).__name__}; expected a list of "
                        f"{n} integers 0..{top}")
    if len(labels) != n:
        raise DataError(f"{path} holds {len(labels)} labels for {n} images; expected one "
                        "label per image")
    try:
        array = np.asarray(labels)
    except ValueError:  # ragged nesting, e.g. [[1], 2]
        array = np.asarray(labels, dtype=object)
    if array.ndim != 1:
        raise DataError(f"{path}: '{key}' is nested, shape {list(array.shape)}; expected a "
                        f"flat list of {n} integers 0..{top}")
    # Huge Python ints also give an object array; the range check below reports those.
    if array.dtype.kind not in "iu":
        bad = next((v for v in labels if not _is_int(v)), labels[0])
        if not _is_int(bad):
            raise DataError(f"{path}: '{key}' holds {type(bad).__name__} values such as "
                            f"{bad!r:.40}; expected integers 0..{top}")
    if not 0 <= array.min() <= array.max() <= top:
        at = next(i for i, v in enumerate(array) if not 0 <= v <= top)
        raise DataError(f"{path} holds label {array[at]} at index {at}; expected 0..{top}")
    return array.astype(np.int64)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


# --- binary batches -------------------------------------------------------------------------

def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read CIFAR-10 binary batch {path}: {reason(exc)}; expected a "
                        "readable file") from None
    if raw.size == 0 or raw.size % _RECORD:
        raise DataError(f"{path} is not a CIFAR-10 binary batch: its size ({raw.size} bytes) "
                        f"is not a multiple of {_RECORD}")
    records = raw.reshape(-1, _RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        at = int(np.argmax(labels > 9))
        raise DataError(f"{path} holds label {labels[at]} in record {at}; expected 0..9 "
                        f"(records of {_RECORD} bytes: a label byte, then 3072 pixels)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_batches(folder: Path, kind: str) -> tuple[ArrayDataset, ArrayDataset]:
    """The five training batches concatenated in order, and the test batch."""
    names, read = ((PICKLE_FILES, _read_pickle_batch) if kind == "python"
                   else (BINARY_FILES, _read_binary_batch))
    parts = [read(folder / name) for name in names]
    images = np.concatenate([images for images, _ in parts[:-1]])
    labels = np.concatenate([labels for _, labels in parts[:-1]])
    return _dataset(images, labels), _dataset(*parts[-1])


def _dataset(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
    """Labels were checked per file (0..9), so an error could name the batch at fault."""
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
