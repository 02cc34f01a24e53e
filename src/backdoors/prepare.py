"""`backdoors data NAME`: put a dataset where the shipped configs look for it.

    backdoors data mnist                  # the official MNIST files -> .data/mnist (online)
    backdoors data mnist-split            # the project's MNIST split -> .data/mnist-split
    backdoors data cifar10                # CIFAR-10 -> .data/cifar10

The MNIST split (train = the first 8,000 images of the official test set, test = the last
2,000) is what every MNIST config and figure of this project uses: it trains in seconds
per epoch on a CPU. It is made from the official `t10k-*` files found in `--from`
(default: `../shared/data/mnist-t10k` when present, else `.data/mnist`, downloading the
official files when online). CIFAR-10 comes from an archive or folder given with `--from`
(default: `../shared/data/cifar10-jpg.tar.gz` when present), else it is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from backdoors.data.cifar import extract_shared_cifar, load_cifar10
from backdoors.data.download import safe_extract_tar
from backdoors.data.mnist import DEFAULT_DIR as MNIST_DIR
from backdoors.data.mnist import load_mnist, write_mnist_split
from backdoors.errors import DataError

DATASETS = ("mnist", "mnist-split", "cifar10")
SHARED = Path("../shared/data")
DEFAULTS = {"mnist": MNIST_DIR, "mnist-split": Path(".data/mnist-split"),
            "cifar10": Path(".data/cifar10")}


def prepare(name: str, source: str | None = None, dest: str | None = None,
            n_train: int = 8000) -> Path:
    """Prepare dataset `name` in `dest` (default: where the configs look); return it."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; expected one of: {', '.join(DATASETS)}")
    out = Path(dest).expanduser() if dest else DEFAULTS[name]
    if name == "mnist":
        load_mnist(out, download=True)
        return out
    if name == "mnist-split":
        return write_mnist_split(_mnist_source(source), out, n_train=n_train)
    return _cifar10(source, out)


def _mnist_source(source: str | None) -> Path:
    if source is not None:
        return Path(source).expanduser()
    shared = SHARED / "mnist-t10k"
    if shared.is_dir():
        return shared
    load_mnist(MNIST_DIR, download=True)  # the official files, fetched when missing
    return MNIST_DIR


def _cifar10(source: str | None, out: Path) -> Path:
    archive = Path(source).expanduser() if source else SHARED / "cifar10-jpg.tar.gz"
    if source is None and not archive.is_file():
        load_cifar10(out, download=True)  # the official python version, when online
        return out
    if not archive.is_file():
        raise DataError(f"--from {archive} is not a file; expected a CIFAR-10 .tar.gz archive "
                        "(the official cifar-10-python.tar.gz, or an image-folder one such "
                        "as ../shared/data/cifar10-jpg.tar.gz)")
    if "python" in archive.name or "batches" in archive.name:
        out.mkdir(parents=True, exist_ok=True)
        safe_extract_tar(archive, out)
        load_cifar10(out)  # checks what was extracted
        return out
    return extract_shared_cifar(archive, out)
