"""Bad dataset input ends in one DataError line naming the file or folder, never a traceback.

Each case writes a tiny dataset in its official format, breaks one thing, and loads it
through the task registry (streaming tasks also through the Loader, with a worker process
where that is what would fail).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backdoors.data import TASKS, Loader, cifar
from backdoors.data.cifar import CLASS_NAMES
from backdoors.data.mnist import write_idx
from backdoors.errors import DataError

CPU = torch.device("cpu")
SMALL = {"image_size": 8, "resize": 8}  # streaming tasks: 8x8 crops keep decoding instant


# --- writers for the official formats ------------------------------------------------------

def write_mnist(folder: Path, n: int = 4, suffix: str = ".gz") -> None:
    """The four MNIST IDX files with n random digits each."""
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8))


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 byte strings, as in the files on the CIFAR site (Python 3's
    protocol 2 would call _codecs.encode, which the reader rightly refuses)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def cifar_batch(n: int = 2, **changes: Any) -> bytes:
    """A CIFAR-10 python batch as the site ships it: a Python 2 pickle with byte-string
    keys; `changes` replace or add entries (keys given as str)."""
    rng = np.random.default_rng(1)
    batch = {"batch_label": b"training batch", "data": rng.integers(0, 256, (n, 3072), np.uint8),
             "labels": list(range(n)), "filenames": [b"x.png"] * n, **changes}
    return py2_pickle({k.encode(): v for k, v in batch.items()})


def write_cifar_pickles(root: Path, broken: str = "data_batch_2", payload: bytes = b"") -> Path:
    """cifar-10-batches-py/ with `broken` replaced by `payload`; returns that file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in cifar.PICKLE_FILES:
        (folder / name).write_bytes(cifar_batch())
    (folder / broken).write_bytes(payload)
    return folder / broken


def write_cifar_binary(root: Path, broken: str, payload: bytes) -> Path:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in cifar.BINARY_FILES:
        (folder / name).write_bytes(bytes([3]) + bytes(3072))
    (folder / broken).write_bytes(payload)
    return folder / broken


def write_cifar_folder(root: Path) -> None:
    """{train,test}/<class>/0.png: one 32x32 PNG per class and split."""
    for split in ("train", "test"):
        for name in CLASS_NAMES:
            (root / split / name).mkdir(parents=True)
            colour = (len(name) * 20, 90, 160)
            Image.new("RGB", (32, 32), colour).save(root / split / name / "0.png")


def write_image_folder(root: Path, classes: dict[str, dict[str, int]]) -> None:
    """split -> {class: number of 12x10 images}, alternating .png and .jpg."""
    for split, counts in classes.items():
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                path = root / split / name / f"{i}{'.png' if i % 2 else '.jpg'}"
                Image.new("RGB", (12, 10), (30 * i, 80, 200)).save(path)


def write_pipa(root: Path, photos: Callable[[type], Any] | None = None, **files: Any) -> None:
    """Backdoors 101's PIPA archive: the four .pt files (pickled with its `Annotations`
    class, under the module name it had) and the photos; `files` replace .pt contents."""
    module = types.ModuleType("dataset.pipa")
    annotations = type("Annotations", (), {"__module__": "dataset.pipa"})
    module.Annotations = annotations  # type: ignore[attr-defined]
    sys.modules.update({"dataset": types.ModuleType("dataset"), "dataset.pipa": module})

    def head(photo: int, subset: int, **box: int) -> Any:
        record = annotations()
        record.__dict__.update({"photoset_id": 7, "photo_id": photo, "xmin": 2, "ymin": 2,
                                "width": 6, "height": 6, "identity_id": 100 + photo,
                                "subset_id": subset, **box})
        return record

    contents = {"train_split.pt": [("a", [101])], "test_split.pt": [("b", [102, 5])],
                "photo_list.pt": {"a": [head(1, 1)], "b": [head(2, 2)]},
                "target_identities.pt": [101]}
    if photos is not None:
        contents["photo_list.pt"] = photos(head)
    contents.update({f"{name}.pt": value for name, value in files.items()})
    try:
        for name, value in contents.items():
            torch.save(value, root / name)
    finally:
        del sys.modules["dataset"], sys.modules["dataset.pipa"]
    for split, photo in (("train", 1), ("test", 2)):
        (root / split).mkdir()
        Image.new("RGB", (16, 16), (200, 0, 0)).save(root / split / f"7_{photo}.jpg")


# --- loading ---------------------------------------------------------------------------------

def load(task_name: str, options: dict[str, Any]) -> None:
    """Build the task, load both splits, and stream them when they are streaming datasets."""
    task = TASKS.build(task_name, options, "task")
    for dataset in (task.train, task.test):
        if not hasattr(dataset, "images"):
            workers = getattr(task, "num_workers", 0)
            for _ in Loader(dataset, 2, CPU, num_workers=workers):
                pass


def chmod_blocks_reads(folder: Path) -> bool:
    """False when this process reads files despite mode 000 (root, CAP_DAC_OVERRIDE)."""
    probe = folder / ".probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        probe.unlink()


@pytest.fixture
def unreadable() -> Iterator[list[Path]]:
    """Paths a case chmods to 000; their permissions come back after the test."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.chmod(0o700)


# --- the cases -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """`build(tmp, unreadable)` writes the broken dataset under tmp and returns (task
    options, the file or folder the message must name); `needle` must be in it too."""

    id: str
    task: str
    build: Callable[[Path, list[Path]], tuple[dict[str, Any], Path]]
    needle: str
    chmod: bool = False


def _mnist(tmp: Path, name: str, payload: bytes | None = None,
           array: np.ndarray | None = None) -> tuple[dict[str, Any], Path]:
    write_mnist(tmp)
    path = tmp / name
    if array is not None:
        write_idx(path, array)
    if payload is not None:
        path.write_bytes(payload)
    return {"data_dir": str(tmp)}, path


def _idx(dims: tuple[int, ...], data: bytes, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data


def mnist_gz_cut(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_mnist(tmp)
    path = tmp / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:300])
    return {"data_dir": str(tmp)}, path


def mnist_header_too_long(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _mnist(tmp, "t10k-images-idx3-ubyte.gz",
                  gzip.compress(_idx((60000, 28, 28), bytes(4 * 784))))


def mnist_raw_truncated(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_mnist(tmp, suffix="")
    path = tmp / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-2])
    return {"data_dir": str(tmp)}, path


def mnist_bad_magic(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _mnist(tmp, "train-labels-idx1-ubyte.gz", gzip.compress(b"\x12\x34" + bytes(10)))


def mnist_gz_is_text(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _mnist(tmp, "t10k-labels-idx1-ubyte.gz", "label\n7\ncaf\xe9\n".encode("latin-1"))


def mnist_label_count(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _mnist(tmp, "train-labels-idx1-ubyte.gz", array=np.zeros(3, np.uint8))


def mnist_label_range(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _mnist(tmp, "t10k-labels-idx1-ubyte.gz", array=np.array([1, 2, 12, 3], np.uint8))


def mnist_float_labels(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _mnist(tmp, "train-labels-idx1-ubyte.gz",
                  gzip.compress(_idx((4,), np.zeros(4, ">f4").tobytes(), type_code=0x0D)))


def mnist_no_images(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    options, path = _mnist(tmp, "train-images-idx3-ubyte.gz",
                           array=np.zeros((0, 28, 28), np.uint8))
    return {**options, "train_size": 4, "test_size": 4}, path  # multimnist draws from it


def counting_wrong_size(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    options, path = _mnist(tmp, "t10k-images-idx3-ubyte.gz",
                           array=np.zeros((4, 32, 32), np.uint8))
    return {**options, "train_size": 4, "test_size": 4}, path


def mnist_data_dir_is_file(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    path = tmp / "mnist.tar.gz"
    path.write_bytes(b"not extracted")
    return {"data_dir": str(path)}, path


def mnist_misspelt_file(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_mnist(tmp)
    (tmp / "train-images-idx3-ubyte.gz").rename(tmp / "train-images.idx3-ubyte.gz")
    return {"data_dir": str(tmp)}, tmp


def mnist_unreadable_file(tmp: Path, locked: list[Path]) -> tuple[dict[str, Any], Path]:
    write_mnist(tmp)
    path = tmp / "t10k-images-idx3-ubyte.gz"
    path.chmod(0)
    locked.append(path)
    return {"data_dir": str(tmp)}, path


def _cifar(tmp: Path, payload: bytes) -> tuple[dict[str, Any], Path]:
    return {"data_dir": str(tmp)}, write_cifar_pickles(tmp, payload=payload)


def cifar_pickle_cut(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _cifar(tmp, cifar_batch()[:700])


def cifar_pickle_not_dict(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _cifar(tmp, py2_pickle([1, 2, 3]))


def cifar_string_labels(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _cifar(tmp, cifar_batch(labels=["a", "b"]))


def cifar_label_count(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _cifar(tmp, cifar_batch(labels=[1, 2, 3]))


def cifar_label_range(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _cifar(tmp, cifar_batch(labels=[4, 10]))


def cifar_float_data(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _cifar(tmp, cifar_batch(data=np.zeros((2, 3072), np.float32)))


def cifar_data_shape(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _cifar(tmp, cifar_batch(data=np.zeros((2, 1024), np.uint8)))


def cifar_misspelt_key(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    payload = py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"label": [1, 2],
                          b"\xff\xfebatch": b"a key that is not UTF-8"})
    return _cifar(tmp, payload)


def cifar100_batch(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    payload = py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1, 2],
                          b"coarse_labels": [0, 0]})
    return _cifar(tmp, payload)


def cifar_binary_cut(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return {"data_dir": str(tmp)}, write_cifar_binary(tmp, "data_batch_4.bin", bytes(3073 + 9))


def cifar_binary_label(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    payload = (bytes([1]) + bytes(3072)) + (bytes([200]) + bytes(3072))
    return {"data_dir": str(tmp)}, write_cifar_binary(tmp, "test_batch.bin", payload)


def cifar_png_garbage(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_cifar_folder(tmp)
    path = tmp / "train" / "cat" / "0.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    return {"data_dir": str(tmp)}, path


def cifar_jpeg_cut(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_cifar_folder(tmp)
    path = tmp / "test" / "dog" / "1.jpg"
    noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:400])
    return {"data_dir": str(tmp)}, path


def cifar_empty_class(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_cifar_folder(tmp)
    folder = tmp / "train" / "frog"
    (folder / "0.png").rename(folder / "0.webp")
    return {"data_dir": str(tmp)}, folder


def cifar_misspelt_class(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_cifar_folder(tmp)
    (tmp / "test" / "horse").rename(tmp / "test" / "horses")
    return {"data_dir": str(tmp)}, tmp / "test"


def image_folder_dir_is_file(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    path = tmp / "imagenet"
    path.write_text("train/\nval/\n")
    return {"data_dir": str(path), **SMALL}, path


def image_folder_class_without_images(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_image_folder(tmp, {"train": {"cat": 2, "dog": 0}, "val": {"cat": 1, "dog": 1}})
    (tmp / "train" / "dog" / "0.webp").write_bytes(b"RIFF")
    return {"data_dir": str(tmp), **SMALL}, tmp / "train" / "dog"


def image_folder_misspelt_val_class(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_image_folder(tmp, {"train": {"cat": 1, "dog": 1}, "val": {"cats": 1, "dog": 1}})
    return {"data_dir": str(tmp), **SMALL}, tmp / "val"


def image_folder_worker_decode(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_image_folder(tmp, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    path = tmp / "train" / "cat" / "1.png"
    path.write_bytes(b"not a png")
    return {"data_dir": str(tmp), "num_workers": 1, **SMALL}, path


def image_folder_getitem_decode(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    write_image_folder(tmp, {"train": {"cat": 1, "dog": 1}, "val": {"cat": 2, "dog": 1}})
    path = tmp / "val" / "cat" / "0.jpg"
    path.write_bytes(path.read_bytes()[:200])
    return {"data_dir": str(tmp), "num_workers": 0, **SMALL}, path


def image_folder_unreadable(tmp: Path, locked: list[Path]) -> tuple[dict[str, Any], Path]:
    write_image_folder(tmp, {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "dog": 1}})
    folder = tmp / "train" / "dog"
    folder.chmod(0)
    locked.append(folder)
    return {"data_dir": str(tmp), **SMALL}, folder


def _pipa(tmp: Path, name: str, **kwargs: Any) -> tuple[dict[str, Any], Path]:
    write_pipa(tmp, **kwargs)
    return {"data_dir": str(tmp), "num_workers": 0, **SMALL}, tmp / name


def pipa_cut_archive(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    options, path = _pipa(tmp, "photo_list.pt")
    path.write_bytes(path.read_bytes()[:120])
    return options, path


def pipa_text_not_utf8(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    options, path = _pipa(tmp, "target_identities.pt")
    path.write_bytes("identity;name\n101;Ren\xe9e\n".encode("latin-1"))
    return options, path


def pipa_no_identities(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _pipa(tmp, "train_split.pt", train_split=[("a", [])])


def pipa_unknown_photo(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _pipa(tmp, "test_split.pt", test_split=[("zz", [1])])


def pipa_zero_box(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    def photos(head: Callable[..., Any]) -> dict[str, Any]:
        return {"a": [head(1, 1, width=0, height=0)], "b": [head(2, 2)]}
    return _pipa(tmp, "photo_list.pt", photos=photos)


def pipa_targets_not_ints(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    return _pipa(tmp, "target_identities.pt", target_identities=["Renee"])


def pipa_photo_missing_in_worker(tmp: Path, _: list[Path]) -> tuple[dict[str, Any], Path]:
    options, _ = _pipa(tmp, "train_split.pt")
    path = tmp / "test" / "7_2.jpg"
    path.unlink()
    return {**options, "num_workers": 1}, path


CASES = [
    Case("mnist-gz-truncated", "mnist", mnist_gz_cut, "cannot read IDX file"),
    Case("mnist-header-says-more-items", "mnist", mnist_header_too_long, "is truncated"),
    Case("mnist-raw-truncated", "mnist", mnist_raw_truncated, "is truncated"),
    Case("mnist-bad-magic", "mnist", mnist_bad_magic, "bad magic number"),
    Case("mnist-gz-is-latin1-text", "mnist", mnist_gz_is_text, "Not a gzipped file"),
    Case("mnist-label-count", "mnist", mnist_label_count, "one label per image"),
    Case("mnist-label-range", "mnist", mnist_label_range, "label 12 at index 2"),
    Case("mnist-float-labels", "mnist", mnist_float_labels, "uint8 labels"),
    Case("multimnist-no-images", "multimnist", mnist_no_images, "holds no images"),
    Case("counting-wrong-image-size", "counting", counting_wrong_size, "[N, 28, 28]"),
    Case("mnist-data-dir-is-archive", "mnist", mnist_data_dir_is_file, "extract it first"),
    Case("mnist-misspelt-file", "mnist", mnist_misspelt_file,
         "did you mean 'train-images-idx3-ubyte.gz'?"),
    Case("mnist-unreadable-file", "mnist", mnist_unreadable_file, "Permission denied", True),
    Case("cifar-pickle-truncated", "cifar10", cifar_pickle_cut, "cannot read CIFAR batch"),
    Case("cifar-pickle-not-a-dict", "cifar10", cifar_pickle_not_dict, "expected a dict"),
    Case("cifar-string-labels", "cifar10", cifar_string_labels, "str values such as 'a'"),
    Case("cifar-label-count", "cifar10", cifar_label_count, "3 labels for 2 images"),
    Case("cifar-label-range", "cifar10", cifar_label_range, "label 10 at index 1"),
    Case("cifar-float-data", "cifar10", cifar_float_data, "'data' is float32 [2, 3072]"),
    Case("cifar-data-shape", "cifar10", cifar_data_shape, "expected uint8 [N, 3072]"),
    Case("cifar-misspelt-key", "cifar10", cifar_misspelt_key, "did you mean 'labels'?"),
    Case("cifar-100-batch", "cifar10", cifar100_batch, "CIFAR-100"),
    Case("cifar-binary-truncated", "cifar10", cifar_binary_cut, "not a multiple of 3073"),
    Case("cifar-binary-label-range", "cifar10", cifar_binary_label, "label 200 in record 1"),
    Case("cifar-png-garbage", "cifar10", cifar_png_garbage, "cannot decode image"),
    Case("cifar-jpeg-truncated", "cifar10", cifar_jpeg_cut, "cannot decode image"),
    Case("cifar-class-without-images", "cifar10", cifar_empty_class, "'0.webp'"),
    Case("cifar-misspelt-class", "cifar10", cifar_misspelt_class, "did you mean 'horse'?"),
    Case("image-folder-data-dir-is-file", "image_folder", image_folder_dir_is_file,
         "not a folder"),
    Case("image-folder-class-without-images", "image_folder",
         image_folder_class_without_images, "holds no .jpg/.jpeg/.png images"),
    Case("image-folder-misspelt-val-class", "image_folder", image_folder_misspelt_val_class,
         "did you mean 'cat'?"),
    Case("image-folder-decode-in-worker", "image_folder", image_folder_worker_decode,
         "cannot decode image"),
    Case("image-folder-decode-in-getitem", "image_folder", image_folder_getitem_decode,
         "cannot decode image"),
    Case("image-folder-unreadable-class", "image_folder", image_folder_unreadable,
         "cannot list folder", True),
    Case("pipa-archive-truncated", "pipa", pipa_cut_archive, "failed reading zip archive"),
    Case("pipa-latin1-text-as-archive", "pipa", pipa_text_not_utf8, "not a pickle"),
    Case("pipa-photo-without-identities", "pipa", pipa_no_identities, "lists no identities"),
    Case("pipa-unknown-photo", "pipa", pipa_unknown_photo, "names photo 'zz'"),
    Case("pipa-zero-size-box", "pipa", pipa_zero_box, "zero size"),
    Case("pipa-targets-not-integers", "pipa", pipa_targets_not_ints, "integer identity ids"),
    Case("pipa-photo-missing-in-worker", "pipa", pipa_photo_missing_in_worker,
         "No such file or directory"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, case: Case,
                                               unreadable: list[Path]) -> None:
    if case.chmod and not chmod_blocks_reads(tmp_path):
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 000 does not block reads")
    options, culprit = case.build(tmp_path, unreadable)
    with pytest.raises(DataError) as caught:
        load(case.task, options)
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(culprit) in message, message
    assert case.needle in message, message


# --- not errors: what recovers, and the loader's worker messages -----------------------------

def test_corrupt_cifar_cache_is_rebuilt(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path)
    first = TASKS.build("cifar10", {"data_dir": str(tmp_path)}, "task").train
    caches = sorted((tmp_path / ".backdoors-cache").glob("*.safetensors"))
    assert len(caches) == 2
    caches[0].write_bytes(caches[0].read_bytes()[:90])  # truncated
    caches[1].write_bytes(os.urandom(400))  # garbage
    again = TASKS.build("cifar10", {"data_dir": str(tmp_path)}, "task")
    assert torch.equal(again.train.images, first.images) and len(again.test) == 10
    assert all(len(p.read_bytes()) > 400 for p in caches)  # rewritten whole


def test_cifar_cache_with_other_labels_is_not_trusted(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    write_cifar_folder(tmp_path)
    first = TASKS.build("cifar10", {"data_dir": str(tmp_path)}, "task").train
    for cache in (tmp_path / ".backdoors-cache").glob("*.safetensors"):
        tensors = load_file(cache)
        save_file({"images": tensors["images"], "labels": tensors["labels"].flip(0)}, cache)
    assert torch.equal(TASKS.build("cifar10", {"data_dir": str(tmp_path)}, "task").train.labels,
                       first.labels)


def test_file_names_that_are_not_utf8_still_load(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path)
    folder = os.fsencode(tmp_path / "train" / "cat")
    os.rename(os.path.join(folder, b"0.png"), os.path.join(folder, b"caf\xe9.png"))
    assert len(TASKS.build("cifar10", {"data_dir": str(tmp_path)}, "task").train) == 10


class _Failing:
    """A streaming dataset whose sample 1 raises `error` (in the worker, with workers)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.labels = torch.zeros(3, dtype=torch.long)

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if index == 1:
            raise self.error
        return torch.zeros(1, 2, 2), 0, -1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (DataError("cannot decode image /d/x.png: broken"), "cannot decode image /d/x.png: broken"),
        (ValueError("two\nlines"), "DataLoader worker process 0 failed: ValueError: two lines"),
        (KeyError("k"), "DataLoader worker process 0 failed: KeyError: 'k'"),
    ],
)
def test_worker_errors_become_one_line(error: Exception, expected: str) -> None:
    with pytest.raises(DataError) as caught:
        list(Loader(_Failing(error), 1, CPU, num_workers=1))  # type: ignore[arg-type]
    assert "\n" not in str(caught.value) and str(caught.value).startswith(expected)


def test_errors_without_workers_are_left_alone() -> None:
    with pytest.raises(ValueError, match="two\nlines"):
        list(Loader(_Failing(ValueError("two\nlines")), 1, CPU))  # type: ignore[arg-type]
