"""GTSRB, the German Traffic Sign Recognition Benchmark (Stallkamp et al., IJCNN 2011 and
Neural Networks 2012), from its official archives: .ppm images of varying size with
semicolon-separated annotation files, decoded and resized once, then cached."""

from __future__ import annotations

import csv
import itertools
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backdoors.data.checks import reason, require_folder
from backdoors.data.dataset import ArrayDataset
from backdoors.data.download import download_file, safe_extract_zip
from backdoors.data.image_cache import cache_dir, cached_images, decode_parallel
from backdoors.data.image_folder import image_error, list_classes
from backdoors.data.task import TASKS, DownloadableTask
from backdoors.errors import DataError

DEFAULT_DIR = Path(".data/gtsrb")
NUM_CLASSES = 43
BASE_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
TRAIN_ZIP, TEST_ZIP, TEST_GT_ZIP = ("GTSRB_Final_Training_Images.zip",
                                    "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip")
# MD5 sums of the archives. The two test archives' sums are the ones other loaders
# (torchvision among them) verify. No sum of the training archive is published that we
# can vouch for, so it is downloaded unverified: extraction checks every member's CRC-32
# and reading checks each class's annotation file and images.
ARCHIVE_MD5: dict[str, str | None] = {
    TRAIN_ZIP: None,
    TEST_ZIP: "c7e4e6327067d32654124b0fe9e82185",
    TEST_GT_ZIP: "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
}
TEST_GT = "GT-final_test.csv"
_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
Sample = tuple[str, tuple[int, int, int, int]]  # image path, ROI box (x1, y1, x2, y2)


def _base(root: Path) -> Path:
    """`root/GTSRB` (where the archives unpack) when it exists, else `root` itself."""
    return root / "GTSRB" if (root / "GTSRB").is_dir() else root


def _test_gt(test_dir: Path) -> Path | None:
    """GT-final_test.csv in Final_Test/Images/ or next to it in Final_Test/ (the labels
    ship in a separate archive, so users put them in either place)."""
    return next((p for p in (test_dir / "Images" / TEST_GT, test_dir / TEST_GT) if p.is_file()),
                None)


def _read_gt(path: Path, images: Path) -> tuple[list[Sample], list[int]]:
    """Samples and labels from one annotation file (Filename;Width;Height;Roi.X1;Roi.Y1;
    Roi.X2;Roi.Y2;ClassId); `Filename` is relative to `images`."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter=";"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read GTSRB annotation file {path}: {reason(exc)}; expected a "
                        "readable semicolon-separated file") from None
    header = [name.strip() for name in rows[0]] if rows else []
    missing = [name for name in _COLUMNS if name not in header]
    if missing:
        raise DataError(f"{path} lacks column {missing[0]} (header: {';'.join(header) or 'none'})"
                        f"; expected {';'.join(_COLUMNS)} and Width;Height, separated by ';'")
    at = [header.index(name) for name in _COLUMNS]
    samples, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a trailing empty line
        try:
            name, *numbers = (row[i].strip() for i in at)
            x1, y1, x2, y2, label = (int(v) for v in numbers)
        except (IndexError, ValueError):
            raise DataError(f"{path} line {line} is malformed ({';'.join(row)[:80]!r}); "
                            f"expected integer ROI and ClassId columns") from None
        if not 0 <= label < NUM_CLASSES:
            raise DataError(f"{path} line {line} has ClassId {label}; expected 0..42")
        samples.append((str(images / name), (x1, y1, x2, y2)))
        labels.append(label)
    if not samples:
        raise DataError(f"{path} lists no images; expected one line per image after the header")
    return samples, labels


def _read_train(train_dir: Path) -> tuple[list[Sample], list[int], list[str]]:
    """Every class folder's GT-<class>.csv; classes are interleaved (first image of every
    class, then the second, ...) so that `max_train_samples` keeps a balanced prefix, as
    for image folders. Also returns the annotation files (for the cache key)."""
    classes = list_classes(train_dir)
    if not classes:
        raise DataError(f"no class folders in {train_dir}; expected <5-digit class>/ folders "
                        "holding .ppm images and GT-<class>.csv")
    per_class, annotations = [], []
    for name in classes:
        gt = train_dir / name / f"GT-{name}.csv"
        if not gt.is_file():
            raise DataError(f"GTSRB annotation file {gt} not found; expected each class folder "
                            f"of {train_dir} to hold GT-<class>.csv")
        per_class.append(list(zip(*_read_gt(gt, gt.parent), strict=True)))
        annotations.append(str(gt))
    rows = [r for row in itertools.zip_longest(*per_class) for r in row if r is not None]
    return [s for s, _ in rows], [label for _, label in rows], annotations


def _decode_chunk(samples: list[Sample], size: int, crop_roi: bool) -> np.ndarray:
    """Decode .ppm files to RGB, optionally crop the ROI, resize to `size`x`size`
    (bilinear, antialiased when shrinking); uint8 [n, size, size, 3]. Runs in a worker."""
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, (path, (x1, y1, x2, y2)) in enumerate(samples):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            if crop_roi:
                # Roi.X2/Y2 name the last pixel inside the sign; PIL's box ends exclusive.
                rgb = rgb.crop((x1, y1, x2 + 1, y2 + 1))
            out[i] = np.asarray(rgb.resize((size, size), Image.BILINEAR))
        except Exception as exc:  # PIL's decoders raise many types on corrupt files
            raise image_error(path, exc) from None
    return out


def _split(folder: Path, samples: list[Sample], labels: list[int], annotations: list[str],
           size: int, crop_roi: bool, cache: Path | None) -> ArrayDataset:
    decode = partial(_decode_chunk, size=size, crop_roi=crop_roi)
    return cached_images(
        prefix="gtsrb", folder=folder, files=[*annotations, *(p for p, _ in samples)],
        labels=labels, shape=(3, size, size), options=f"size={size},crop_roi={crop_roi}",
        decode=lambda: decode_parallel(decode, samples, (size, size, 3)), cache=cache)


def _download(root: Path, base: Path) -> Path:
    """Fetch and unpack whichever of the three archives is missing; returns the new base."""
    if not (base / "Final_Training" / "Images").is_dir():
        _fetch(root, TRAIN_ZIP, root)
    base = _base(root)
    if not (base / "Final_Test" / "Images").is_dir():
        _fetch(root, TEST_ZIP, root)
    if _test_gt(base / "Final_Test") is None:
        # The labels archive holds GT-final_test.csv alone: put it next to the test images.
        _fetch(root, TEST_GT_ZIP, base / "Final_Test")
    return base


def _fetch(root: Path, name: str, into: Path) -> None:
    md5 = ARCHIVE_MD5[name]
    archive = download_file([BASE_URL + name], root / name, md5=md5, unverified=md5 is None)
    safe_extract_zip(archive, into)


def load_gtsrb(data_dir: str | Path | None = None, size: int = 32, crop_roi: bool = False,
               download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from the official GTSRB layout under `data_dir` (default `.data/gtsrb`)."""
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DIR
    require_folder(root, "GTSRB/Final_Training/Images/ and GTSRB/Final_Test/Images/")
    base = _base(root)
    train_dir, test_dir = base / "Final_Training" / "Images", base / "Final_Test"
    if download:
        base = _download(root, base)
        train_dir, test_dir = base / "Final_Training" / "Images", base / "Final_Test"
    if not train_dir.is_dir():
        raise DataError(f"GTSRB training images not found: looked for {train_dir}/<class>/ "
                        f"(from {TRAIN_ZIP}, unpacked in {root}); set download: true to fetch "
                        f"it from {BASE_URL}")
    if not (test_dir / "Images").is_dir():
        raise DataError(f"GTSRB test images not found: looked for {test_dir}/Images/*.ppm "
                        f"(from {TEST_ZIP}, unpacked in {root}); set download: true to fetch "
                        f"it from {BASE_URL}")
    gt = _test_gt(test_dir)
    if gt is None:
        raise DataError(f"GTSRB test labels not found: looked for {test_dir / 'Images' / TEST_GT}"
                        f" and {test_dir / TEST_GT}; the test images ship without labels, "
                        f"which come in {TEST_GT_ZIP}; set download: true to fetch it from "
                        f"{BASE_URL}")
    cache = cache_dir(base)
    samples, labels, annotations = _read_train(train_dir)
    train = _split(train_dir, samples, labels, annotations, size, crop_roi, cache)
    samples, labels = _read_gt(gt, test_dir / "Images")
    test = _split(test_dir / "Images", samples, labels, [str(gt)], size, crop_roi, cache)
    return train, test


@TASKS.register("gtsrb")
class GtsrbTask(DownloadableTask):
    """GTSRB traffic signs (Stallkamp et al., IJCNN 2011): 39,209 train / 12,630 test, 43 classes.

    The German Traffic Sign Recognition Benchmark (Stallkamp et al., IJCNN 2011; Neural
    Networks 32, 2012). Reads the official layout under `data_dir` (default `.data/gtsrb`):
    `GTSRB/Final_Training/Images/<class>/*.ppm` with `GT-<class>.csv`, and
    `GTSRB/Final_Test/Images/*.ppm` with `GT-final_test.csv` (in `Images/` or next to it).
    Labels are the ClassId column. Images are resized to `size`x`size` (default 32),
    after cropping to the annotated sign when `crop_roi: true`, decoded once and cached.
    `download: true` fetches the archives from the official site. No augmentation: the
    project's augmentation flips images, which turns one sign into another.
    """

    num_classes = NUM_CLASSES
    input_shape = (3, 32, 32)
    # Approximate per-channel statistics of the training set at 32x32 (the values commonly
    # quoted for GTSRB, not computed here); normalisation only needs them roughly right.
    mean = (0.3403, 0.3121, 0.3214)
    std = (0.2724, 0.2608, 0.2669)
    default_model = "resnet18"
    default_augment = False

    def __init__(
        self,
        size: int = 32,
        crop_roi: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if self.augment:
            raise ValueError("augment: true would flip traffic signs horizontally (the "
                             "augmentation is random crop + flip), which changes their "
                             "meaning, e.g. 'keep right' into 'keep left'; leave it off")
        self.size, self.crop_roi = size, crop_roi
        self.input_shape = (3, size, size)

    def _load(self) -> tuple[ArrayDataset, ArrayDataset]:
        return load_gtsrb(self.data_dir, self.size, self.crop_roi, self.download)
