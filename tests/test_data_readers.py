"""Readers for MNIST, CIFAR-10, image folders and MultiMNIST, on tiny generated files.

Tests marked `real_data` use ../shared/data and skip when it is absent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoors.data import TASKS, cifar, cifar_folder, mnist
from backdoors.data.cifar import CLASS_NAMES, extract_shared_cifar
from backdoors.data.cifar_batches import PICKLE_FILES
from backdoors.data.download import download_file, safe_extract_tar
from backdoors.data.image_folder import resize_center_crop
from backdoors.data.mnist import read_idx, write_idx, write_mnist_split
from backdoors.data.multimnist import compose_pairs
from backdoors.errors import DataError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _write_mnist(folder: Path, n_train: int, n_test: int, suffix: str = ".gz") -> None:
    """Fake MNIST: random pixels, labels cycling 0..9."""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}",
                  _rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10)


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- IDX and MNIST --------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    array = _rng().integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.uint8 and np.array_equal(back, array)


def test_write_idx_is_deterministic_and_uint8_only(tmp_path: Path) -> None:
    array = np.arange(20, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "c", np.zeros(3, dtype=np.float32))


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x08",  # too short for a magic number
        b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc",  # bad magic
        b"\x00\x00\x08\x03" + struct.pack(">II", 2, 28),  # header cut short
        b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"abc",  # fewer bytes than the header says
        b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc",  # trailing bytes
    ],
)
def test_malformed_idx_raises_data_error(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="bad-idx1-ubyte"):
        read_idx(path)


def test_corrupt_gzip_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte.gz"
    payload = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 999) + os.urandom(999))
    path.write_bytes(payload[:500])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_task_reads_files(tmp_path: Path, suffix: str) -> None:
    _write_mnist(tmp_path, 30, 20, suffix)
    task = TASKS.get("mnist")(data_dir=str(tmp_path))
    assert (task.input_shape, task.mean, task.default_model) == ((1, 28, 28), (0.1307,),
                                                                "simple_net")
    assert task.train.images.shape == (30, 1, 28, 28) and task.train.images.dtype == torch.uint8
    assert task.test.labels.dtype == torch.int64 and task.test.labels.tolist()[:11] == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    raw = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    assert np.array_equal(task.train.images[:, 0].numpy(), raw)


def test_mnist_accepts_torchvision_layout(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "MNIST" / "raw", 10, 10)
    assert len(TASKS.get("mnist")(data_dir=str(tmp_path), max_train_samples=4).train) == 4


def test_mnist_missing_files_explain_where_and_how(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError) as exc:
        _ = TASKS.get("mnist")(data_dir=str(tmp_path)).train
    message = _one_line(exc)
    assert "train-images-idx3-ubyte" in message and str(tmp_path) in message
    assert "backdoors data mnist-split" in message and "backdoors data mnist" in message


def test_mnist_rejects_wrong_image_size(tmp_path: Path) -> None:
    _write_mnist(tmp_path, 4, 4)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"\[N, 28, 28\]"):
        _ = TASKS.get("mnist")(data_dir=str(tmp_path)).train


def test_mnist_download_tries_mirrors_and_verifies(tmp_path: Path, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    _write_mnist(mirror, 12, 8)
    md5 = {p.name[:-3]: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.glob("*.gz")}
    monkeypatch.setattr(mnist, "MNIST_MD5", md5)
    monkeypatch.setattr(mnist, "MIRRORS", ((tmp_path / "nowhere").as_uri() + "/",
                                           mirror.as_uri() + "/"))
    task = TASKS.get("mnist")(data_dir=str(tmp_path / "data"), download=True)
    assert (len(task.train), len(task.test)) == (12, 8)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(p.name for p in
                                                                          mirror.iterdir())


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "file.bin"
    source.write_bytes(b"payload")
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(DataError) as exc:
        download_file([source.as_uri()], dest, sha256="0" * 64)
    assert "sha256" in _one_line(exc)
    assert list(dest.parent.iterdir()) == []
    good = hashlib.sha256(b"payload").hexdigest()
    assert download_file([source.as_uri()], dest, sha256=good).read_bytes() == b"payload"


def test_write_mnist_split(tmp_path: Path) -> None:
    src = tmp_path / "t10k"
    images = _rng().integers(0, 256, (100, 28, 28), dtype=np.uint8)
    write_idx(src / "t10k-images-idx3-ubyte.gz", images)
    write_idx(src / "t10k-labels-idx1-ubyte.gz", np.arange(100, dtype=np.uint8) % 10)
    out = write_mnist_split(src, tmp_path / "split", n_train=60)
    task = TASKS.get("mnist")(data_dir=str(out))
    assert (len(task.train), len(task.test)) == (60, 40)
    assert np.array_equal(task.train.images[:, 0].numpy(), images[:60])
    assert np.array_equal(task.test.images[:, 0].numpy(), images[60:])
    stamp = (out / "train-images-idx3-ubyte.gz").stat().st_mtime_ns
    write_mnist_split(src, out, n_train=60)  # already there: nothing rewritten
    assert (out / "train-images-idx3-ubyte.gz").stat().st_mtime_ns == stamp
    write_mnist_split(src, out, n_train=50)  # other sizes: rewritten
    assert len(TASKS.get("mnist")(data_dir=str(out)).train) == 50
    with pytest.raises(ValueError, match="n_train"):
        write_mnist_split(src, out, n_train=100)


# --- CIFAR-10 -------------------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, like the files on the CIFAR site."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _py2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _fake_cifar(n: int = 20) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Six batches (data_batch_1..5, test_batch) of n random images [n, 3, 32, 32]."""
    rng = _rng(1)
    return [(name, rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
             rng.integers(0, 10, n).astype(np.int64)) for name in PICKLE_FILES]


def _write_cifar_pickles(folder: Path, batches, py2: bool = True) -> None:
    folder.mkdir(parents=True)
    for name, images, labels in batches:
        batch = {"batch_label": name, "data": images.reshape(len(images), -1),
                 "labels": labels.tolist(), "filenames": [f"{i}.png" for i in range(len(labels))]}
        data = _py2_pickle(batch) if py2 else pickle.dumps(batch, protocol=4)
        (folder / name).write_bytes(data)


def _check_cifar(task, batches) -> None:
    images = np.concatenate([b[1] for b in batches[:-1]])
    labels = np.concatenate([b[2] for b in batches[:-1]])
    assert task.train.images.shape == (100, 3, 32, 32) and task.train.images.dtype == torch.uint8
    assert np.array_equal(task.train.images.numpy(), images)
    assert task.train.labels.tolist() == labels.tolist()
    assert np.array_equal(task.test.images.numpy(), batches[-1][1])
    assert task.test.labels.tolist() == batches[-1][2].tolist()


@pytest.mark.parametrize("py2", [True, False])
def test_cifar_python_pickles(tmp_path: Path, py2: bool) -> None:
    batches = _fake_cifar()
    _write_cifar_pickles(tmp_path / "cifar-10-batches-py", batches, py2)
    task = TASKS.get("cifar10")(data_dir=str(tmp_path))
    assert task.class_names == CLASS_NAMES and task.input_shape == (3, 32, 32)
    _check_cifar(task, batches)


def test_cifar_binary_batches(tmp_path: Path) -> None:
    batches = _fake_cifar()
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name, images, labels in batches:
        records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(20, -1)], 1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    _check_cifar(TASKS.get("cifar10")(data_dir=str(tmp_path)), batches)
    (folder / "test_batch.bin").write_bytes(bytes(3000))
    with pytest.raises(DataError, match="multiple of 3073"):
        _ = TASKS.get("cifar10")(data_dir=str(tmp_path)).test


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_malicious_pickle(tmp_path: Path) -> None:
    batches = _fake_cifar(2)
    _write_cifar_pickles(tmp_path / "cifar-10-batches-py", batches, py2=False)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=4)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil)
    with pytest.raises(DataError) as exc:
        _ = TASKS.get("cifar10")(data_dir=str(tmp_path)).train
    assert "refusing to load global" in _one_line(exc) and "system" in str(exc.value)
    assert not marker.exists()


def _write_cifar_folder(root: Path, per_class: int = 3) -> dict[str, np.ndarray]:
    """PNG image folder with `per_class` train and 2 test images per class; returns pixels."""
    rng, pixels = _rng(2), {}
    for split, n in (("train", per_class), ("test", 2)):
        for name in CLASS_NAMES:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                hwc = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(hwc).save(root / split / name / f"{i:04d}.png")
                pixels[f"{split}/{name}/{i}"] = hwc.transpose(2, 0, 1)
    return pixels


def test_cifar_image_folder_and_cache(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "cifar10-jpg"
    pixels = _write_cifar_folder(root)
    first = TASKS.get("cifar10")(data_dir=str(tmp_path))
    # Classes interleave, so any prefix is class-balanced.
    assert first.train.labels.tolist() == list(range(10)) * 3
    assert np.array_equal(first.train.images[12].numpy(), pixels["train/bird/1"])
    assert np.array_equal(first.test.images[19].numpy(), pixels["test/truck/1"])
    assert len(list((root / ".backdoors-cache").glob("*.safetensors"))) == 2

    def no_decoding(paths):
        raise AssertionError("the second load should come from the cache")

    monkeypatch.setattr(cifar_folder, "_decode_all", no_decoding)
    second = TASKS.get("cifar10")(data_dir=str(tmp_path))
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.test.labels, first.test.labels)
    monkeypatch.undo()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "0009.png")
    assert len(TASKS.get("cifar10")(data_dir=str(tmp_path)).train) == 31  # cache invalidated
    assert len(list((root / ".backdoors-cache").glob("*.safetensors"))) == 2  # stale one gone


def test_cifar_image_folder_checks_classes_and_sizes(tmp_path: Path) -> None:
    _write_cifar_folder(tmp_path, per_class=1)
    Image.new("RGB", (30, 30)).save(tmp_path / "test" / "cat" / "0005.png")
    with pytest.raises(DataError, match="needs 32x32"):
        _ = TASKS.get("cifar10")(data_dir=str(tmp_path)).test
    (tmp_path / "train" / "unicorn").mkdir()
    with pytest.raises(DataError, match="same 10 class folders"):
        _ = TASKS.get("cifar10")(data_dir=str(tmp_path)).train


def test_cifar_missing_lists_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        _ = TASKS.get("cifar10")(data_dir=str(tmp_path)).train
    message = _one_line(exc)
    for expected in ("cifar-10-batches-py", "cifar-10-batches-bin", "{train,test}/<class>/",
                     str(tmp_path), "backdoors data cifar10"):
        assert expected in message


def test_cifar_download_extracts_python_version(tmp_path: Path, monkeypatch) -> None:
    staging = tmp_path / "staging"
    batches = _fake_cifar(4)
    _write_cifar_pickles(staging / "cifar-10-batches-py", batches)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar, "CIFAR_URL", archive.as_uri())
    monkeypatch.setattr(cifar, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    task = TASKS.get("cifar10")(data_dir=str(tmp_path / "data"), download=True)
    assert len(task.train) == 20 and np.array_equal(task.test.images.numpy(), batches[-1][1])


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> None:
    with tarfile.open(path, "w:gz") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


def test_safe_extract_refuses_traversal_and_links(tmp_path: Path) -> None:
    _tar_with(tmp_path / "up.tar.gz", tarfile.TarInfo("../escaped.txt"))
    with pytest.raises(DataError, match="unsafe path"):
        safe_extract_tar(tmp_path / "up.tar.gz", tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tar_with(tmp_path / "link.tar.gz", link)
    with pytest.raises(DataError, match="link"):
        safe_extract_tar(tmp_path / "link.tar.gz", tmp_path / "out")


def test_extract_shared_cifar_once(tmp_path: Path) -> None:
    _write_cifar_folder(tmp_path / "src" / "cifar10-jpg", per_class=1)
    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpg", arcname="cifar10-jpg")
    root = extract_shared_cifar(archive, tmp_path / "cache")
    assert root == tmp_path / "cache" / "cifar10-jpg" and (root / "test" / "truck").is_dir()
    archive.unlink()  # a second call must not need the archive
    assert extract_shared_cifar(archive, tmp_path / "cache") == root
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cifar10-jpg"]
    assert len(TASKS.get("cifar10")(data_dir=str(root)).test) == 20


# --- image folders --------------------------------------------------------------------------

def _write_image_folder(root: Path, split: str, sizes: dict[str, list[tuple[int, int]]]) -> None:
    for name, whs in sizes.items():
        (root / split / name).mkdir(parents=True)
        for i, (w, h) in enumerate(whs):
            ext = ".png" if i % 2 else ".JPG"
            Image.new("RGB", (w, h), (40 * i, 100, 200)).save(root / split / name / f"{i}{ext}")


def test_image_folder_streams(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, "train", {"cat": [(40, 30), (30, 50), (64, 64)],
                                            "dog": [(50, 40)], "emu": [(24, 24), (33, 20)]})
    _write_image_folder(tmp_path, "test", {"dog": [(40, 40)], "emu": [(20, 30)]})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    task = TASKS.get("image_folder")(data_dir=str(tmp_path), image_size=16, resize=20)
    # Metadata comes from the class folders, before any image is read.
    assert task._data is None
    assert (task.num_classes, task.class_names, task.input_shape) == (
        3, ("cat", "dog", "emu"), (3, 16, 16))
    assert task.train.labels.tolist() == [0, 1, 2, 0, 2, 0]  # interleaved by class
    assert task.test.labels.tolist() == [1, 2]
    x, label, aux = task.train[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and (label, aux) == (1, -1)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert abs(float(x[2].mean()) - 200 / 255) < 0.02
    batch = next(iter(torch.utils.data.DataLoader(task.train, batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16) and batch[1].tolist() == [0, 1, 2, 0]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        TASKS.get("image_folder")(data_dir=str(tmp_path))
    assert "train/<class>/" in _one_line(exc)
    _write_image_folder(tmp_path, "train", {"cat": [(8, 8)]})
    _write_image_folder(tmp_path, "val", {"cow": [(8, 8)]})
    with pytest.raises(DataError, match="cow"):
        _ = TASKS.get("image_folder")(data_dir=str(tmp_path), image_size=8, resize=8).test
    with pytest.raises(ValueError, match="image_size"):
        TASKS.get("image_folder")(data_dir=str(tmp_path), image_size=32, resize=16)


def test_resize_center_crop_matches_torchvision_arithmetic() -> None:
    image = Image.new("L", (40, 20))
    image.putpixel((20, 10), 255)  # the centre pixel stays central after resize and crop
    out = resize_center_crop(image, 10, 8)
    assert out.size == (8, 8)
    arr = np.asarray(out)
    assert np.unravel_index(arr.argmax(), arr.shape) in {(4, 4), (4, 5), (5, 4), (5, 5)}


# --- MultiMNIST -----------------------------------------------------------------------------

def test_compose_pairs_places_digits_side_by_side() -> None:
    left = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    right = torch.zeros((1, 1, 28, 28), dtype=torch.uint8)
    out = compose_pairs(left, right, overlap=8)[0, 0]
    assert out.shape == (28, 28) and out[:, 0].min() == 255 and out[:, -1].max() == 0
    assert torch.equal(compose_pairs(right, left, 8)[0, 0], out.flip(-1))


def test_multimnist_is_deterministic(tmp_path: Path) -> None:
    _write_mnist(tmp_path, 40, 30)
    make = TASKS.get("multimnist")
    task = make(data_dir=str(tmp_path), train_size=50, test_size=20)
    assert (task.num_classes, task.input_shape, task.default_model) == (100, (1, 28, 28),
                                                                      "simple_net")
    train = task.train
    assert train.images.shape == (50, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.aux.shape == (50, 2) and train.aux.dtype == torch.int64
    assert torch.equal(train.labels, 10 * train.aux[:, 0] + train.aux[:, 1])
    assert len(set(train.labels.tolist())) > 20 and len(task.test) == 20
    again = make(data_dir=str(tmp_path), train_size=50, test_size=20)
    assert torch.equal(again.train.images, train.images)
    assert torch.equal(again.test.aux, task.test.aux)
    bigger = make(data_dir=str(tmp_path), train_size=80, test_size=20)
    assert torch.equal(bigger.test.images, task.test.images)  # test pairs ignore train_size
    other = make(data_dir=str(tmp_path), train_size=50, test_size=20, seed=1)
    assert not torch.equal(other.train.labels, train.labels)


# --- registry and real data -----------------------------------------------------------------

def test_tasks_are_registered() -> None:
    for name in ("mnist", "cifar10", "image_folder", "multimnist"):
        assert TASKS.describe(name)
        TASKS.check(name, {"data_dir": "somewhere"}, f"task[{name}]")


@pytest.mark.real_data
@needs_shared
def test_real_mnist_standard_split(tmp_path: Path) -> None:
    t10k = mnist.read_mnist_split(SHARED / "mnist-t10k", "t10k")
    assert len(t10k) == 10000
    # The shared copy's counts (its sha256 is in shared/data/README.md). They differ from
    # the often quoted official ones (980, 1135, 1032, ...) in a few classes.
    assert t10k.labels.bincount().tolist() == [981, 1142, 1035, 1010, 982, 885, 954, 1023,
                                               978, 1010]
    task = TASKS.get("mnist")(data_dir=str(write_mnist_split(SHARED / "mnist-t10k", tmp_path)))
    assert (len(task.train), len(task.test)) == (8000, 2000)
    assert task.train.labels.bincount().tolist() == [780, 910, 837, 799, 789, 720, 751, 810,
                                                     791, 813]
    assert torch.equal(torch.cat([task.train.images, task.test.images]), t10k.images)
    assert torch.equal(torch.cat([task.train.labels, task.test.labels]), t10k.labels)


@pytest.fixture(scope="session")
def real_cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("shared-cifar10")
    yield extract_shared_cifar(SHARED / "cifar10-jpg.tar.gz", cache)
    # 60,000 files: remove them now rather than leave them to pytest's tmp rotation.
    shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.real_data
@needs_shared
def test_real_cifar_jpg(real_cifar_root: Path) -> None:
    task = TASKS.get("cifar10")(data_dir=str(real_cifar_root))
    assert (len(task.train), len(task.test)) == (50000, 10000)
    assert task.train.labels.bincount().tolist() == [5000] * 10
    assert task.test.labels.bincount().tolist() == [1000] * 10
    mean = task.train.images[:5000].float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(task.mean), atol=0.02)
    cached = TASKS.get("cifar10")(data_dir=str(real_cifar_root))
    assert torch.equal(cached.train.images, task.train.images)


def test_mnist_test_split_splits_the_official_test_set(tmp_path: Path) -> None:
    folder = tmp_path / "t10k-only"
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(30, dtype=np.uint8) % 10)
    task = TASKS.build("mnist", {"data_dir": str(folder), "test_split": 24}, "task")
    assert len(task.train) == 24 and len(task.test) == 6
    assert np.array_equal(task.train.images[:, 0].numpy(), images[:24])
    assert np.array_equal(task.test.images[:, 0].numpy(), images[24:])
    same = TASKS.build("mnist", {"data_dir": str(write_mnist_split(folder, tmp_path / "s", 24))},
                       "task")
    assert np.array_equal(same.train.images.numpy(), task.train.images.numpy())
    with pytest.raises(DataError, match="test_split"):
        _ = TASKS.build("mnist", {"data_dir": str(folder), "test_split": 30}, "task").train
    with pytest.raises(DataError, match="t10k"):
        _ = TASKS.build("mnist", {"data_dir": str(tmp_path / "s" / "nope"),
                                  "test_split": 5}, "task").train
