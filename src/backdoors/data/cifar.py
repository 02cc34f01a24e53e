"""CIFAR-10 from any of its usual layouts: python pickles, binary batches (cifar_batches.py)
or an image folder (cifar_folder.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from backdoors.data.checks import near_miss, require_folder
from backdoors.data.cifar_batches import BINARY_FILES, PICKLE_FILES, read_batches
from backdoors.data.cifar_folder import read_split_folders
from backdoors.data.dataset import ArrayDataset
from backdoors.data.download import download_file, safe_extract_tar
from backdoors.data.task import TASKS, DownloadableTask
from backdoors.errors import DataError

DEFAULT_DIR = Path(".data/cifar10")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")



def _layouts(root: Path) -> list[tuple[str, Path]]:
    """Where each layout may sit under `root`, in order of preference (exact pixels first).
    `root/cifar10/` is searched too, where `backdoors data cifar10` puts the data, so a
    Backdoors 101 file's `data_path: .data/` finds it."""
    out: list[tuple[str, Path]] = []
    for base in (root, root / "cifar10"):
        out += [("python", base / "cifar-10-batches-py"), ("python", base),
                ("binary", base / "cifar-10-batches-bin"), ("binary", base),
                ("folder", base), ("folder", base / "cifar10-jpg")]
    return out


def _present(kind: str, folder: Path) -> bool:
    if kind == "folder":
        return (folder / "train").is_dir() and (folder / "test").is_dir()
    names = PICKLE_FILES if kind == "python" else BINARY_FILES
    return all((folder / name).is_file() for name in names)


def _near_layout(root: Path) -> str:
    """A hint when a layout is almost there: a misspelt batch or folder, or one unreadable."""
    names = [*PICKLE_FILES, *BINARY_FILES, "cifar-10-batches-py", "cifar-10-batches-bin",
             "cifar10-jpg", "cifar10", "train", "test"]
    folders = dict.fromkeys(folder for _, folder in _layouts(root) if folder.is_dir())
    return next((hint for folder in folders if (hint := near_miss(folder, names))), "")


def load_cifar10(
    data_dir: str | Path | None = None, download: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from whichever CIFAR-10 layout `data_dir` (default `.data/cifar10`) holds."""
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DIR
    require_folder(root, "CIFAR-10 (cifar-10-batches-py/, cifar-10-batches-bin/ or "
                   "{train,test}/<class>/)")
    found = next(((k, f) for k, f in _layouts(root) if _present(k, f)), None)
    if found is None and download:
        archive = download_file([CIFAR_URL], root / "cifar-10-python.tar.gz", md5=CIFAR_MD5)
        safe_extract_tar(archive, root)
        found = ("python", root / "cifar-10-batches-py")
    if found is None:
        raise DataError(
            f"CIFAR-10 not found in {root}: looked for cifar-10-batches-py/ (data_batch_1..5, "
            "test_batch), cifar-10-batches-bin/ (*.bin) and {train,test}/<class>/ image "
            f"folders (also under cifar10-jpg/ or cifar10/){_near_layout(root)}; prepare it with "
            f"`backdoors data cifar10` (from ../shared/data, or downloaded from {CIFAR_URL})"
        )
    kind, folder = found
    return read_split_folders(folder) if kind == "folder" else read_batches(folder, kind)


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
class Cifar10Task(DownloadableTask):
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

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        return load_cifar10(self.data_dir, self.download)
