"""PIPA people counting with target identities, read from Backdoors 101's preprocessed archive.

PIPA (Zhang et al., "Beyond Frontal Faces: Improving Person Recognition Using Multiple
Cues", CVPR 2015) annotates the heads in Flickr photos with identities. Backdoors 101
(Blind Backdoors, arXiv 2005.03823) turned it into a counting task whose complex backdoor
reveals whether a target person is in the photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from backdoors.data.checks import near_miss, reason, require_folder
from backdoors.data.image_folder import load_image
from backdoors.data.task import TASKS, Task
from backdoors.errors import DataError

DEFAULT_DIR = Path(".data/pipa")
ARCHIVE_FILES = ("train_split.pt", "test_split.pt", "photo_list.pt", "target_identities.pt")
ARCHIVE_URL = "https://drive.google.com/file/d/1IAsTDl6kw4u8kk7Ikyf8K2A4RSPv9izz"
# Where the original code defined the pickled annotation class, over its history.
ANNOTATION_CLASSES = ("dataset.pipa.Annotations", "datasets.pipa.Annotations",
                      "utils.pipa_loader.Annotations", "__main__.Annotations")
MAX_COUNT = 5  # "5 or more people" is the last class


class HeadBox:
    """One annotated head (the original's `Annotations`): photoset_id, photo_id, xmin,
    ymin, width, height, identity_id, subset_id (1 = PIPA train split). Unpickling only
    restores these attributes; the class has no behaviour to run."""

    photoset_id: int
    photo_id: int
    xmin: int
    ymin: int
    width: int
    height: int
    identity_id: int
    subset_id: int


def load_archive_file(path: Path) -> Any:
    """torch.load with weights_only=True, allowing only the annotation class (no code runs)."""
    allowed = [(HeadBox, name) for name in ANNOTATION_CLASSES]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file can raise almost anything
        raise DataError(f"cannot read PIPA archive file {path}: {_load_reason(exc)}; expected "
                        "a torch.save file from Backdoors 101's archive") from None


def _load_reason(exc: Exception) -> str:
    """torch.load's failure in one line. Its weights-only errors span several lines of
    advice; the useful part follows 'WeightsUnpickler error:', and its first sentence says
    what was refused (a class, or bytes that are no pickle at all, e.g. a text file)."""
    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    if isinstance(exc, OSError):
        return reason(exc)
    _, marker, detail = str(exc).partition("WeightsUnpickler error:")
    # The first line of the detail (or of the message), up to its first full stop: e.g.
    # "PytorchStreamReader failed reading zip archive: failed finding central directory".
    first = next((line.strip() for line in (detail or str(exc)).splitlines() if line.strip()), "")
    first = first.split(". ")[0]
    if not marker:
        return first or type(exc).__name__
    if first.startswith("Unsupported global"):
        return f"it holds an object the safe loader refuses ({first})"
    return f"not a pickle the safe loader can read ({first})"


def square_box(heads: Sequence[HeadBox]) -> tuple[int, int, int, int]:
    """(left, upper, right, lower): the union of the photo's head boxes, with the shorter
    side extended (right or down) to make it square, as Backdoors 101 cropped."""
    left = min(h.xmin for h in heads)
    upper = min(h.ymin for h in heads)
    right = max(h.xmin + h.width for h in heads)
    lower = max(h.ymin + h.height for h in heads)
    diff = (right - left) - (lower - upper)
    if diff >= 0:
        lower += diff
    else:
        right -= diff
    return left, upper, right, lower


def count_label(identities: Sequence[int]) -> int:
    """People in the photo, 1..5+ -> class 0..4."""
    return min(len(identities), MAX_COUNT) - 1


def identity_label(identities: Sequence[int], targets: Sequence[int]) -> int:
    """1 + position in `targets` of the last listed target in the photo, 0 if none (the
    original loop overwrote earlier matches)."""
    found = 0
    for pos, target in enumerate(targets):
        if target in identities:
            found = pos + 1
    return found


class PipaDataset:
    """A streaming dataset of square head-group crops: decode, crop, resize to `resize`,
    centre-crop `image_size`, scale to [0, 1]. Items are (image, count class, identity).
    `labels` and `aux` hold every label up front."""

    def __init__(self, paths: list[str], boxes: list[tuple[int, int, int, int]],
                 labels: list[int], aux: list[int], resize: int, image_size: int) -> None:
        self.paths, self.boxes = paths, boxes
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.aux = torch.tensor(aux, dtype=torch.long)
        self.resize, self.image_size = resize, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        # The crop may reach past the border: padded with black, like the original.
        x = load_image(self.paths[index], self.resize, self.image_size, self.boxes[index])
        return x, int(self.labels[index]), int(self.aux[index])


def read_split(root: Path, entries: list, photos: Any, targets: Sequence[int],
               resize: int, image_size: int, source: str = "split") -> PipaDataset:
    """One split of the archive: `entries` are (photo key, identities in the photo).

    `source` names the split file in errors; each malformed entry is reported with its
    index, and the photo it names, rather than as a bare KeyError or IndexError.
    """
    split_file, photo_file = root / source, root / "photo_list.pt"
    if not isinstance(entries, list | tuple) or not entries:
        raise DataError(f"{split_file} holds {_describe(entries)}; expected a non-empty list "
                        "of (photo key, identities) pairs")
    paths, boxes, labels, aux = [], [], [], []
    for i, entry in enumerate(entries):
        key, identities = _entry(entry, split_file, i)
        try:
            heads = photos[key]
        except (KeyError, TypeError):  # TypeError: an unhashable key
            raise DataError(f"{split_file} entry {i} names photo {key!r:.40}, which "
                            f"{photo_file} lacks; expected head boxes for every listed "
                            "photo") from None
        path, box = _photo(root, heads, key, photo_file)
        paths.append(path)
        boxes.append(box)
        labels.append(count_label(identities))
        aux.append(identity_label(identities, targets))
    return PipaDataset(paths, boxes, labels, aux, resize, image_size)


def _describe(value: object) -> str:
    empty = isinstance(value, list | tuple | dict) and not value
    return f"an empty {type(value).__name__}" if empty else type(value).__name__


def _entry(entry: object, source: Path, i: int) -> tuple[Any, Sequence[int]]:
    """(photo key, identities) of entry `i` of `source`; identities must name at least one
    person, or the count label would be -1."""
    try:
        key, identities = entry  # type: ignore[misc]
        count = len(identities)
    except (TypeError, ValueError):
        raise DataError(f"{source} entry {i} is {entry!r:.60}; expected a (photo key, list of "
                        "identities) pair") from None
    if not count:
        raise DataError(f"{source} entry {i} (photo {key!r:.40}) lists no identities; "
                        "expected at least one person per photo")
    return key, identities


def _photo(root: Path, heads: Any, key: Any,
           source: Path) -> tuple[str, tuple[int, int, int, int]]:
    """The image path and crop box of photo `key` from its `heads` (read from `source`)."""
    try:
        first = heads[0]
        folder = "train" if first.subset_id == 1 else "test"
        path = str(root / folder / f"{first.photoset_id}_{first.photo_id}.jpg")
        box = square_box(heads)
        empty = box[2] <= box[0] or box[3] <= box[1]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{source} photo {key!r:.40} has malformed head boxes "
                        f"({type(exc).__name__}: {reason(exc)}); expected a non-empty list of "
                        "annotations with photoset_id, photo_id, xmin, ymin, width, height and "
                        "subset_id") from None
    if empty:
        raise DataError(f"{source} photo {key!r:.40} has head boxes of zero size {box}; "
                        "expected positive width and height")
    return path, box


def _targets(targets: Any, source: Path) -> list[int]:
    try:
        return [int(t) for t in targets]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source} holds {_describe(targets)} ({reason(exc)}); expected a list "
                        "of integer identity ids") from None


@TASKS.register("pipa")
class PipaTask(Task):
    """PIPA people counting (1..5+) with target identities, Backdoors 101's Pipa task.

    From Blind Backdoors (arXiv 2005.03823): 5 classes (1, 2, 3, 4, 5+ people), aux =
    target identity (1 + index in the archive's target list; 0 = none of them in the
    photo).

    Reads Backdoors 101's archive from `data_dir` (default `.data/pipa`): `train_split.pt`
    and `test_split.pt` (lists of (photo key, identities)), `photo_list.pt` (photo key ->
    head boxes), `target_identities.pt`, and the photos `train/` and `test/`
    `<photoset_id>_<photo_id>.jpg`. The pickles are read with torch's weights-only loader
    that only rebuilds their annotation records. Each sample is the square box around
    all heads, resized to `resize` (default 256) and centre-cropped to `image_size`
    (224), streamed by `num_workers` loader processes; augmentation (random crop + flip)
    is on by default. The original also re-weighted classes in its sampler and losses;
    that is not reproduced here. ImageNet statistics and `resnet18_imagenet` by default.
    """

    num_classes = MAX_COUNT
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    default_model = "resnet18_imagenet"
    default_augment = True

    def __init__(
        self,
        image_size: int = 224,
        resize: int = 256,
        num_workers: int = 2,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if image_size < 1 or resize < image_size:
            raise ValueError(f"need 1 <= image_size <= resize, got {image_size} and {resize}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.image_size, self.resize, self.num_workers = image_size, resize, num_workers
        self.input_shape = (3, image_size, image_size)
        self.root = self.data_dir or DEFAULT_DIR

    def _load(self) -> tuple[PipaDataset, PipaDataset]:
        require_folder(self.root, f"Backdoors 101's PIPA archive ({', '.join(ARCHIVE_FILES)})")
        missing = [name for name in ARCHIVE_FILES if not (self.root / name).is_file()]
        if missing:
            raise DataError(f"PIPA archive not found in {self.root}: missing "
                            f"{', '.join(missing)}{near_miss(self.root, ARCHIVE_FILES)}; get "
                            f"Backdoors 101's archive ({ARCHIVE_URL}) and unpack it there")
        train, test, photos, targets = (load_archive_file(self.root / n) for n in ARCHIVE_FILES)
        if not isinstance(photos, dict):
            raise DataError(f"{self.root / 'photo_list.pt'} holds {type(photos).__name__}; "
                            "expected a dict from photo key to head boxes")
        targets = _targets(targets, self.root / "target_identities.pt")
        return (read_split(self.root, train, photos, targets, self.resize, self.image_size,
                           "train_split.pt"),
                read_split(self.root, test, photos, targets, self.resize, self.image_size,
                           "test_split.pt"))
