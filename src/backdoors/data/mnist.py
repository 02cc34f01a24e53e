"""MNIST from the standard IDX files, plus helpers to write IDX files and the benchmark split."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backdoors.data.checks import near_miss, reason, require_folder
from backdoors.data.dataset import ArrayDataset
from backdoors.data.download import download_file
from backdoors.data.task import TASKS, DownloadableTask
from backdoors.errors import DataError

DEFAULT_DIR = Path(".data/mnist")
# The official files and the MD5 sums of their .gz versions (as published with torchvision).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
# yann.lecun.com is the original host but often refuses scripted downloads, so it goes last.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# IDX type codes (third magic byte) -> numpy dtype; multi-byte types are big-endian.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw, or gzip when the name ends in .gz) into a native-order array.

    Raises DataError when the file is unreadable, the magic number is wrong, or the data
    length does not match the dimensions in the header.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        kind = "a gzip-compressed IDX file" if path.suffix == ".gz" else "an IDX file"
        raise DataError(f"cannot read IDX file {path}: {reason(exc)}; expected {kind}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: bad magic number {data[:4].hex() or 'none'}, "
                        "expected 000008NN (uint8, NN dimensions)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: its header is incomplete")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        problem = "is truncated" if len(data) - header < expected else "is malformed"
        raise DataError(f"{path} {problem}: header says shape {dims} ({expected} bytes) "
                        f"but it holds {len(data) - header} bytes of data")
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzip-compressed when `path` ends in .gz.

    The write is atomic (temporary file, then rename) and gzip output carries no
    timestamp, so the same array always gives the same bytes.
    """
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx needs a uint8 array, got {array.dtype} {array.shape}")
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def _find(directory: Path, stem: str) -> Path | None:
    """`directory/stem` or `directory/stem.gz`; the raw file wins since it reads faster."""
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _candidates(root: Path) -> list[Path]:
    """Where MNIST may sit under `root`: itself, MNIST/raw (torchvision's layout), mnist/
    (`backdoors data mnist`), then mnist-split/ (`backdoors data mnist-split`), so the
    original's `data_path: .data/` finds either."""
    return [root, root / "MNIST" / "raw", root / "mnist", root / "mnist-split"]


def _locate(root: Path, stems: list[str]) -> Path | None:
    """The first candidate folder under `root` that holds every file in `stems`."""
    for directory in _candidates(root):
        if all(_find(directory, stem) for stem in stems):
            return directory
    return None


def _missing_error(looked: list[Path], stems: list[str], hint: str) -> DataError:
    where = ", ".join(str(d) for d in looked)
    names = [*stems, *(f"{stem}.gz" for stem in stems)]
    misspelt = next((m for d in looked if (m := near_miss(d, names))), "")
    return DataError(f"MNIST files not found: looked in {where} for {', '.join(stems)} "
                     f"(raw or .gz){misspelt}; {hint}")


def _check_split(images: np.ndarray, labels: np.ndarray, files: tuple[Path, Path]) -> None:
    """DataError naming the file unless images are uint8 [N, 28, 28] with N >= 1 and labels
    are N uint8 digits 0..9."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{files[0]} should hold uint8 images [N, 28, 28], got {images.dtype} "
                        f"{list(images.shape)}")
    if not len(images):
        raise DataError(f"{files[0]} holds no images; expected N >= 1 images [N, 28, 28]")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{files[1]} should hold uint8 labels [N], got {labels.dtype} "
                        f"{list(labels.shape)}")
    if len(labels) != len(images):
        raise DataError(f"{files[1]} holds {len(labels)} labels but {files[0].name} holds "
                        f"{len(images)} images; expected one label per image")
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{files[1]} holds label {labels[bad]} at index {bad}; expected digits "
                        "0..9")


def read_mnist_split(directory: Path, prefix: str) -> ArrayDataset:
    """Read `{prefix}-images-idx3-ubyte` and `{prefix}-labels-idx1-ubyte` ("train" or "t10k")."""
    directory = Path(directory)
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    found = [_find(directory, stem) for stem in stems]
    if found[0] is None or found[1] is None:
        raise _missing_error([directory], stems, f"download them from {MIRRORS[0]}")
    images, labels = read_idx(found[0]), read_idx(found[1])
    _check_split(images, labels, (found[0], found[1]))
    return ArrayDataset(torch.from_numpy(images)[:, None], torch.from_numpy(labels).long())


def load_mnist(
    data_dir: str | Path | None = None, download: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from `data_dir` (default `.data/mnist`), downloading missing files if asked."""
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DIR
    require_folder(root, "the MNIST IDX files")
    stems = list(MNIST_MD5)
    directory = _locate(root, stems)
    if directory is None:
        if not download:
            hint = ("prepare them with `backdoors data mnist-split` (the project's split) or "
                    "`backdoors data mnist` (the official files, online)")
            raise _missing_error(_candidates(root), stems, hint)
        for stem, md5 in MNIST_MD5.items():
            if _find(root, stem) is None:
                download_file([f"{m}{stem}.gz" for m in MIRRORS], root / f"{stem}.gz", md5=md5)
        directory = root
    return read_mnist_split(directory, "train"), read_mnist_split(directory, "t10k")


def _idx_length(path: Path) -> int | None:
    """First dimension from an IDX header (None when unreadable); reads only the header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            head = fh.read(8)
        return struct.unpack(">I", head[4:8])[0] if len(head) == 8 else None
    except (OSError, EOFError, zlib.error):
        return None


def official_test_set(src_dir: str | Path) -> ArrayDataset:
    """The official test set (`t10k-*` files) found under `src_dir`."""
    src = Path(src_dir).expanduser()
    require_folder(src, "the MNIST t10k IDX files")
    stems = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    directory = _locate(src, stems)
    if directory is None:
        raise _missing_error(_candidates(src), stems, f"download them from {MIRRORS[0]}")
    return read_mnist_split(directory, "t10k")


def write_mnist_split(src_dir: str | Path, out_dir: str | Path, n_train: int = 8000) -> Path:
    """Split the official MNIST test set into an MNIST-layout folder; returns `out_dir`.

    The project's standard benchmark split when only the test set is at hand: train = the
    first `n_train` (default 8,000) images of `t10k-*` in file order, test = the rest
    (2,000). Does nothing when `out_dir` already holds files of the right sizes.
    """
    out = Path(out_dir).expanduser()
    full = official_test_set(src_dir)
    if not 0 < n_train < len(full):
        raise ValueError(f"n_train must be in 1..{len(full) - 1}, got {n_train}")
    sizes = {"train": n_train, "t10k": len(full) - n_train}
    if all(_idx_length(out / f"{prefix}-{kind}.gz") == n
           for prefix, n in sizes.items() for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")):
        return out
    images, labels = full.images[:, 0].numpy(), full.labels.to(torch.uint8).numpy()
    for prefix, rows in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[rows])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[rows])
    return out


@TASKS.register("mnist")
class MnistTask(DownloadableTask):
    """MNIST handwritten digits (LeCun et al., 1998): 60,000 train / 10,000 test, 1x28x28.

    Reads the four standard IDX files (raw or .gz) from `data_dir` (default `.data/mnist`;
    a folder holding `MNIST/raw/` or `mnist/` also works). With `download: true`, missing
    files are fetched from the public mirrors and checked against their MD5 sums.

    `test_split: N` reads only the official test set (`t10k-*`) and splits it: its first N
    images train, the rest test. `test_split: 8000` is the project's benchmark split, made
    from what `../shared/data/mnist-t10k` holds (the same images as a folder written by
    `write_mnist_split`). No augmentation by default; `simple_net` is the default model.
    """

    input_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)
    default_model = "simple_net"
    default_augment = False

    def __init__(
        self,
        test_split: int | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if test_split is not None and test_split < 1:
            raise ValueError(f"test_split must be >= 1, got {test_split}")
        self.test_split = test_split

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        if self.test_split is None:
            return load_mnist(self.data_dir, self.download)
        full = official_test_set(self.data_dir or DEFAULT_DIR)
        if self.test_split >= len(full):
            raise DataError(f"task.test_split: {self.test_split} leaves no test images of the "
                            f"{len(full)} in the official test set; expected 1..{len(full) - 1}")
        n = self.test_split
        return full.subset(slice(0, n)), full.subset(slice(n, None))
