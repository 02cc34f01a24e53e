"""CIFAR-100 from its python version (`cifar-100-python/{train,test,meta}`), read through
the restricted unpickler that CIFAR-10's batches use (cifar_batches.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from backdoors.data.checks import near_miss, require_folder
from backdoors.data.cifar_batches import checked_labels, load_array_pickle, pickled_data
from backdoors.data.dataset import ArrayDataset
from backdoors.data.download import download_file, safe_extract_tar
from backdoors.data.task import TASKS, DownloadableTask
from backdoors.errors import DataError

DEFAULT_DIR = Path(".data/cifar100")
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FILES = ("train", "test", "meta")

# The label indices of the official files, in order (the `meta` file lists the same names;
# they are spelt out here so a config knows its classes before any data loads).
FINE_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
COARSE_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)
_NAMES = {"fine": FINE_NAMES, "coarse": COARSE_NAMES}


def _locate(root: Path) -> Path | None:
    """`root/cifar-100-python` (the archive's folder) or `root` itself, whichever holds
    train, test and meta."""
    for folder in (root / "cifar-100-python", root):
        if all((folder / name).is_file() for name in FILES):
            return folder
    return None


def _read_split(path: Path, label: str) -> ArrayDataset:
    key, classes = f"{label}_labels", len(_NAMES[label])
    expected = "a CIFAR-100 file with 'data', 'fine_labels' and 'coarse_labels'"
    batch = load_array_pickle(path, "CIFAR-100 file",
                              "'data', 'fine_labels' and 'coarse_labels'")
    data = pickled_data(batch, path, expected)
    labels = checked_labels(batch, len(data), path, key, classes, expected)
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels))


def _check_meta(path: Path, label: str) -> None:
    """The meta file must list as many names as the label set has classes: a mismatch
    means the files are not CIFAR-100's (or the wrong `label` set was assumed)."""
    key = f"{label}_label_names"
    meta = load_array_pickle(path, "CIFAR-100 meta file",
                             "'fine_label_names' and 'coarse_label_names'")
    names = meta.get(key)
    if not isinstance(names, list | tuple):
        raise DataError(f"{path} has no '{key}' list (keys: {', '.join(sorted(meta)) or 'none'})"
                        f"; expected the CIFAR-100 meta file")
    if len(names) != len(_NAMES[label]):
        raise DataError(f"{path} lists {len(names)} {label} label names; expected "
                        f"{len(_NAMES[label])} (CIFAR-100)")


def load_cifar100(data_dir: str | Path | None = None, label: str = "fine",
                  download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) with `label` ("fine" or "coarse") labels, from `data_dir` (default
    `.data/cifar100`), downloading the python version first when asked."""
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DIR
    require_folder(root, "cifar-100-python/{train,test,meta}")
    folder = _locate(root)
    if folder is None and download:
        archive = download_file([CIFAR100_URL], root / "cifar-100-python.tar.gz",
                                md5=CIFAR100_MD5)
        safe_extract_tar(archive, root)
        folder = _locate(root)
    if folder is None:
        hint = next((h for f in (root / "cifar-100-python", root) if (h := near_miss(f, FILES))),
                    "")
        partial = root / "cifar-100-python"
        lacking = [name for name in FILES if not (partial / name).is_file()]
        if partial.is_dir() and not hint:
            hint = f"; {partial} lacks {', '.join(lacking)}"
        raise DataError(f"CIFAR-100 not found in {root}: looked for cifar-100-python/ (and "
                        f"{root} itself) holding the python version's train, test and meta "
                        f"files{hint}; set download: true to fetch it from {CIFAR100_URL}")
    _check_meta(folder / "meta", label)
    return _read_split(folder / "train", label), _read_split(folder / "test", label)


@TASKS.register("cifar100")
class Cifar100Task(DownloadableTask):
    """CIFAR-100 (Krizhevsky, 2009): 50,000 train / 10,000 test colour images, 3x32x32.

    Reads the python version (`cifar-100-python/{train,test,meta}` under `data_dir`,
    default `.data/cifar100`) with an unpickler that only rebuilds numpy arrays.
    `label: fine` (default) gives the 100 classes, `label: coarse` the 20 superclasses;
    classes are in label-index order (alphabetical, as in the meta file). With
    `download: true` the archive is fetched from the Toronto site and checked against its
    MD5. `resnet18` and random crop + flip augmentation by default, as for CIFAR-10.
    """

    num_classes = 100
    input_shape = (3, 32, 32)
    # The usual CIFAR-100 training-set statistics.
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    default_model = "resnet18"
    default_augment = True
    class_names = FINE_NAMES

    def __init__(
        self,
        label: str = "fine",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if label not in _NAMES:
            raise ValueError(f"label must be 'fine' (100 classes) or 'coarse' (20 "
                             f"superclasses), got {label!r}")
        self.label = label
        self.class_names = _NAMES[label]
        self.num_classes = len(self.class_names)

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        return load_cifar100(self.data_dir, self.label, self.download)
