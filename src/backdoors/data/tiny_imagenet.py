"""Tiny-ImageNet-200 (the Stanford CS231n subset of ImageNet) from its official zip layout:
64x64 JPEGs decoded once, then cached as uint8 tensors."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from backdoors.data.checks import near_miss, reason, require_folder
from backdoors.data.dataset import ArrayDataset
from backdoors.data.download import download_file, safe_extract_zip
from backdoors.data.image_cache import cache_dir, cached_images, decode_parallel, decode_rgb
from backdoors.data.image_folder import list_images, require_images
from backdoors.data.task import TASKS, DownloadableTask
from backdoors.errors import DataError, did_you_mean

DEFAULT_DIR = Path(".data/tiny-imagenet")
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"
NUM_CLASSES, SIZE = 200, 64


def _locate(root: Path) -> Path | None:
    """`root/tiny-imagenet-200` (where the zip unpacks) or `root`, whichever has wnids.txt."""
    return next((f for f in (root / FOLDER, root) if (f / "wnids.txt").is_file()), None)


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"Tiny-ImageNet {what} {path} not found; expected it in the "
                        f"{FOLDER}/ folder of {TINY_URL}")
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {reason(exc)}; expected a readable text "
                        "file") from None


def _read_wnids(folder: Path) -> list[str]:
    """The class order: the lines of wnids.txt, in file order. The official file has 200;
    fewer (a subset of the classes) still load, the model keeping 200 outputs."""
    wnids = _read_lines(folder / "wnids.txt", "class list")
    if not 0 < len(wnids) <= NUM_CLASSES or len(set(wnids)) != len(wnids):
        raise DataError(f"{folder / 'wnids.txt'} lists {len(set(wnids))} distinct WordNet "
                        f"ids in {len(wnids)} lines; expected {NUM_CLASSES}, one per line")
    return wnids


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[str], list[int]]:
    """train/<wnid>/images/*.JPEG, classes interleaved (as image folders are) so that
    `max_train_samples` keeps a balanced prefix."""
    train = folder / "train"
    missing = next((w for w in wnids if not (train / w / "images").is_dir()), None)
    if missing is not None:
        raise DataError(f"Tiny-ImageNet training folder {train / missing / 'images'} not found;"
                        f" expected train/<wnid>/images/*.JPEG for every id in wnids.txt"
                        f"{near_miss(train, [missing])}")
    class_dirs = [f"{w}/images" for w in wnids]
    paths, labels = list_images(train, class_dirs)
    require_images(train, class_dirs, labels, every_class=True)
    return paths, labels


def _val_files(folder: Path, wnids: list[str]) -> tuple[list[str], list[int], Path]:
    """val/images/* labelled by val/val_annotations.txt (filename, wnid, box, tab-separated),
    in annotation order; also returns the annotation file (for the cache key)."""
    notes = folder / "val" / "val_annotations.txt"
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for line, text in enumerate(_read_lines(notes, "validation labels"), start=1):
        fields = text.split("\t")
        if len(fields) < 2:
            raise DataError(f"{notes} line {line} is malformed ({text[:60]!r}); expected "
                            "filename, wnid, x0, y0, x1, y1 separated by tabs")
        name, wnid = fields[0], fields[1]
        if wnid not in index:
            raise DataError(f"{notes} line {line} names class {wnid}, which wnids.txt lacks"
                            f"{did_you_mean(wnid, wnids)}")
        paths.append(str(folder / "val" / "images" / name))
        labels.append(index[wnid])
    return paths, labels, notes


def _split(folder: Path, paths: list[str], labels: list[int], notes: list[Path],
           cache: Path | None) -> ArrayDataset:
    decode = partial(decode_rgb, size=SIZE, dataset="Tiny-ImageNet")
    return cached_images(prefix="tiny-imagenet", folder=folder,
                         files=[*(str(n) for n in notes), *paths], labels=labels,
                         shape=(3, SIZE, SIZE), cache=cache,
                         decode=lambda: decode_parallel(decode, paths, (SIZE, SIZE, 3)))


def load_tiny_imagenet(data_dir: str | Path | None = None,
                       download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, val) from `data_dir` (default `.data/tiny-imagenet`); the labelled val split
    is the test set (the official test split has no labels)."""
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DIR
    require_folder(root, f"{FOLDER}/ (wnids.txt, train/, val/)")
    folder = _locate(root)
    if folder is None and download:
        archive = download_file([TINY_URL], root / f"{FOLDER}.zip", md5=TINY_MD5)
        safe_extract_zip(archive, root)
        folder = _locate(root)
    if folder is None:
        raise DataError(f"Tiny-ImageNet not found: looked for {root / FOLDER / 'wnids.txt'} and "
                        f"{root / 'wnids.txt'}{near_miss(root, [FOLDER])}; set download: true "
                        f"to fetch it from {TINY_URL}")
    wnids = _read_wnids(folder)
    cache = cache_dir(folder)
    paths, labels = _train_files(folder, wnids)
    train = _split(folder / "train", paths, labels, [folder / "wnids.txt"], cache)
    paths, labels, notes = _val_files(folder, wnids)
    test = _split(folder / "val", paths, labels, [folder / "wnids.txt", notes], cache)
    return train, test


@TASKS.register("tiny_imagenet")
class TinyImageNetTask(DownloadableTask):
    """Tiny-ImageNet-200 (Le and Yang, 2015): 200 classes, 100,000 train / 10,000 val, 3x64x64.

    "Tiny ImageNet Visual Recognition Challenge" (Stanford CS231N, 2015): a 200-class
    subset of ImageNet downscaled to 64x64.
    Reads `tiny-imagenet-200/` under `data_dir` (default `.data/tiny-imagenet`): the class
    order is the line order of `wnids.txt`; training images are `train/<wnid>/images/*`,
    and the labelled `val/` split (`val/val_annotations.txt`, images in `val/images/`) is
    the test set. Greyscale JPEGs are converted to RGB. Decoded once, then cached.
    `download: true` fetches the zip from the CS231n site and checks its MD5. `resnet18`
    (CIFAR stem, so 64x64 inputs end in an 8x8 map) and crop + flip augmentation by default.
    """

    num_classes = NUM_CLASSES
    input_shape = (3, SIZE, SIZE)
    # Approximate per-channel statistics of the training set (the values commonly quoted
    # for Tiny-ImageNet, not computed here).
    mean = (0.4802, 0.4481, 0.3975)
    std = (0.2302, 0.2265, 0.2262)
    default_model = "resnet18"
    default_augment = True

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        return load_tiny_imagenet(self.data_dir, self.download)
