"""GTSRB, CIFAR-100 and Tiny-ImageNet on tiny files written in their official formats."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from backdoors.cli import main
from backdoors.data import TASKS, cifar100, gtsrb, tiny_imagenet
from backdoors.data.download import safe_extract_zip
from backdoors.errors import ConfigError, DataError

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
SIGN, BORDER = (200, 30, 30), (20, 90, 200)  # colours inside and outside a sign's ROI


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- writers of the official formats --------------------------------------------------------

def _ppm(path: Path, width: int, height: int, roi: tuple[int, int, int, int]) -> None:
    """A .ppm of BORDER with the ROI (inclusive corners) filled with SIGN."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = BORDER
    x1, y1, x2, y2 = roi
    pixels[y1 : y2 + 1, x1 : x2 + 1] = SIGN
    Image.fromarray(pixels).save(path)  # PIL picks PPM from the suffix


def write_gtsrb(root: Path, classes: tuple[int, ...] = (0, 1, 2), per_class: int = 2,
                n_test: int = 4, gt_next_to_images: bool = False) -> None:
    """GTSRB/Final_Training/Images/<class>/ with GT-<class>.csv, Final_Test/Images/ and
    GT-final_test.csv, as the three official archives unpack."""
    train = root / "GTSRB" / "Final_Training" / "Images"
    for label in classes:
        folder = train / f"{label:05d}"
        folder.mkdir(parents=True)
        lines = [GT_HEADER]
        for i in range(per_class):
            name, w, h = f"00000_{i:05d}.ppm", 30 + i, 34
            _ppm(folder / name, w, h, (5, 6, w - 6, h - 6))
            lines.append(f"{name};{w};{h};5;6;{w - 6};{h - 6};{label}")
        (folder / f"GT-{label:05d}.csv").write_text("\n".join(lines) + "\n")
    images = root / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    lines = [GT_HEADER]
    for i in range(n_test):
        name, label = f"{i:05d}.ppm", classes[i % len(classes)]
        _ppm(images / name, 40, 40, (4, 4, 35, 35))
        lines.append(f"{name};40;40;4;4;35;35;{label}")
    gt = (images.parent if gt_next_to_images else images) / "GT-final_test.csv"
    gt.write_text("\n".join(lines) + "\n")


def _cifar100_file(obj: dict[str, Any]) -> bytes:
    """What the official Python 2 pickles give under encoding='bytes': byte-string keys."""
    return pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2)


def write_cifar100(root: Path, n_train: int = 8, n_test: int = 4) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng, arrays = np.random.default_rng(0), {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [(7 * i + 3) % 100 for i in range(n)]
        coarse = [i % 20 for i in range(n)]
        arrays[split] = data
        (folder / split).write_bytes(_cifar100_file({
            "filenames": [b"x.png"] * n, "batch_label": b"training batch 1 of 1",
            "fine_labels": fine, "coarse_labels": coarse, "data": data}))
    (folder / "meta").write_bytes(_cifar100_file({
        "fine_label_names": [n.encode() for n in cifar100.FINE_NAMES],
        "coarse_label_names": [n.encode() for n in cifar100.COARSE_NAMES]}))
    return arrays


WNIDS = ["n09999999", "n01443537"]  # deliberately not sorted: the file's order is the order


def write_tiny(root: Path, per_class: int = 3) -> None:
    """tiny-imagenet-200/ with 2 wnids, JPEG train and val images (one greyscale)."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for c, wnid in enumerate(WNIDS):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            grey = c == 1 and i == 0
            image = (Image.new("L", (64, 64), 120) if grey
                     else Image.new("RGB", (64, 64), (60 * i, 100 * c, 40)))
            image.save(images / f"{wnid}_{i}.JPEG", "JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(4):
        Image.new("RGB", (64, 64), (10, 20, 30 * i)).save(base / "val" / "images" /
                                                          f"val_{i}.JPEG", "JPEG")
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % 2]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def _task(name: str, root: Path, **options: Any) -> Any:
    return TASKS.build(name, {"data_dir": str(root), **options}, "task")


# --- GTSRB ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gt_next_to_images", [False, True])
def test_gtsrb_reads_the_official_layout(tmp_path: Path, gt_next_to_images: bool) -> None:
    write_gtsrb(tmp_path, gt_next_to_images=gt_next_to_images)
    task = _task("gtsrb", tmp_path)
    assert task.num_classes == 43 and task.input_shape == (3, 32, 32) and not task.augment
    assert task.train.images.shape == (6, 3, 32, 32) and task.train.images.dtype == torch.uint8
    assert task.train.labels.tolist() == [0, 1, 2, 0, 1, 2]  # classes interleaved
    assert task.test.labels.tolist() == [0, 1, 2, 0]  # ClassId column of GT-final_test.csv
    assert torch.bincount(task.train.labels).tolist() == [2, 2, 2]
    assert _task("gtsrb", tmp_path, size=20).test.images.shape == (4, 3, 20, 20)


def test_gtsrb_crop_roi_keeps_only_the_sign(tmp_path: Path) -> None:
    write_gtsrb(tmp_path, per_class=1)
    whole = _task("gtsrb", tmp_path).train.images
    cropped = _task("gtsrb", tmp_path, crop_roi=True).train.images
    assert whole[:, :, 0, 0].tolist() == [list(BORDER)] * 3
    assert cropped.permute(0, 2, 3, 1).reshape(-1, 3).unique(dim=0).tolist() == [list(SIGN)]


def test_gtsrb_decodes_once_then_reads_the_cache(tmp_path: Path, monkeypatch) -> None:
    write_gtsrb(tmp_path)
    first = _task("gtsrb", tmp_path)
    _ = first.train, first.test
    cache = tmp_path / "GTSRB" / ".backdoors-cache"
    assert len(list(cache.glob("gtsrb-*.safetensors"))) == 2

    def no_decoding(*args: Any) -> None:
        raise AssertionError("the second load should come from the cache")

    monkeypatch.setattr(gtsrb, "decode_parallel", no_decoding)
    second = _task("gtsrb", tmp_path)
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.test.labels, first.test.labels)
    monkeypatch.undo()
    _ = _task("gtsrb", tmp_path, crop_roi=True).train  # other options: entries of their own
    assert len(list(cache.glob("gtsrb-*.safetensors"))) == 4


def test_gtsrb_refuses_flipping_augmentation() -> None:
    with pytest.raises(ConfigError, match="flip traffic signs"):
        TASKS.build("gtsrb", {"augment": True}, "task")


# --- CIFAR-100 ------------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["fine", "coarse"])
def test_cifar100_fine_and_coarse_labels(tmp_path: Path, label: str) -> None:
    arrays = write_cifar100(tmp_path)
    task = _task("cifar100", tmp_path, label=label)
    assert task.num_classes == (100 if label == "fine" else 20)
    assert task.class_names[0] == ("apple" if label == "fine" else "aquatic_mammals")
    assert task.train.images.shape == (8, 3, 32, 32)
    assert np.array_equal(task.test.images.reshape(4, -1).numpy(), arrays["test"])
    expected = ([(7 * i + 3) % 100 for i in range(8)] if label == "fine"
                else [i % 20 for i in range(8)])
    assert task.train.labels.tolist() == expected


def test_cifar100_refuses_code_in_pickles_and_bad_options(tmp_path: Path) -> None:
    write_cifar100(tmp_path)

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError) as exc:
        _ = _task("cifar100", tmp_path).test
    assert "refusing to load global" in _one_line(exc)
    with pytest.raises(ConfigError, match="'fine'"):
        _task("cifar100", tmp_path, label="superclass")


# --- Tiny-ImageNet --------------------------------------------------------------------------

def test_tiny_imagenet_reads_train_and_val(tmp_path: Path, monkeypatch) -> None:
    write_tiny(tmp_path)
    task = _task("tiny_imagenet", tmp_path)
    assert task.num_classes == 200 and task.input_shape == (3, 64, 64)
    assert task.train.images.shape == (6, 3, 64, 64)
    assert task.train.labels.tolist() == [0, 1, 0, 1, 0, 1]  # wnids.txt order, interleaved
    assert task.test.labels.tolist() == [0, 1, 0, 1]  # from val_annotations.txt
    grey = task.train.images[1]  # the greyscale JPEG, converted to RGB
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert len(list((tmp_path / "tiny-imagenet-200" / ".backdoors-cache").glob("*"))) == 2
    monkeypatch.setattr(tiny_imagenet, "decode_parallel", None)  # any decode would fail
    again = _task("tiny_imagenet", tmp_path)
    assert torch.equal(again.train.images, task.train.images)


# --- one-line errors for missing pieces -----------------------------------------------------

def _drop(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()
    else:
        path.unlink()


MISSING = [
    ("gtsrb", write_gtsrb, "GTSRB/Final_Training", "Final_Training/Images", "download: true"),
    ("gtsrb", write_gtsrb, "GTSRB/Final_Test/Images", "Final_Test/Images", "download: true"),
    ("gtsrb", write_gtsrb, "GTSRB/Final_Test/Images/GT-final_test.csv", "GT-final_test.csv",
     "ship without labels"),
    ("gtsrb", write_gtsrb, "GTSRB/Final_Training/Images/00001/GT-00001.csv", "GT-00001.csv",
     "GT-<class>.csv"),
    ("gtsrb", write_gtsrb, "GTSRB/Final_Test/Images/00002.ppm", "00002.ppm", "readable"),
    ("cifar100", write_cifar100, "cifar-100-python/meta", "cifar-100-python", "download: true"),
    ("tiny_imagenet", write_tiny, "tiny-imagenet-200", "wnids.txt", "download: true"),
    ("tiny_imagenet", write_tiny, "tiny-imagenet-200/val/val_annotations.txt",
     "val_annotations.txt", "not found"),
    ("tiny_imagenet", write_tiny, "tiny-imagenet-200/train/n01443537", "n01443537/images",
     "train/<wnid>/images"),
]


@pytest.mark.parametrize("name, write, drop, named, hint", MISSING,
                         ids=[f"{m[0]}-{m[2].rsplit('/', 1)[-1]}" for m in MISSING])
def test_missing_pieces_give_one_line(tmp_path: Path, name: str, write: Any, drop: str,
                                      named: str, hint: str) -> None:
    write(tmp_path)
    _drop(tmp_path / drop)
    task = _task(name, tmp_path)
    with pytest.raises(DataError) as exc:
        _ = task.train, task.test
    message = _one_line(exc)
    assert named in message and hint in message and str(tmp_path) in message


def test_missing_data_exits_2_through_the_cli(tmp_path: Path, capsys) -> None:
    config = _config("tiny_imagenet", tmp_path / "nothing")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--out", str(tmp_path), "--name", "r", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "download: true" in err


# --- downloads (from file:// URLs) and zip safety -------------------------------------------

def _zip(path: Path, folder: Path, under: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.rglob("*")):
            zf.write(file, file.relative_to(under).as_posix())
    return path


def test_downloads_unpack_the_official_archives(tmp_path: Path, monkeypatch) -> None:
    staging, site = tmp_path / "staging", tmp_path / "site"
    site.mkdir()
    write_tiny(staging)
    archive = _zip(site / "tiny-imagenet-200.zip", staging / "tiny-imagenet-200", staging)
    monkeypatch.setattr(tiny_imagenet, "TINY_URL", archive.as_uri())
    monkeypatch.setattr(tiny_imagenet, "TINY_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    assert len(_task("tiny_imagenet", tmp_path / "tiny", download=True).train) == 6

    write_gtsrb(staging, gt_next_to_images=True)
    gts = staging / "GTSRB"
    _zip(site / gtsrb.TRAIN_ZIP, gts / "Final_Training", staging)
    _zip(site / gtsrb.TEST_ZIP, gts / "Final_Test" / "Images", staging)
    with zipfile.ZipFile(site / gtsrb.TEST_GT_ZIP, "w") as zf:  # the labels alone, at the top
        zf.write(gts / "Final_Test" / "GT-final_test.csv", "GT-final_test.csv")
    monkeypatch.setattr(gtsrb, "BASE_URL", site.as_uri() + "/")
    for name in (gtsrb.TEST_ZIP, gtsrb.TEST_GT_ZIP):  # the training archive stays unverified
        monkeypatch.setitem(gtsrb.ARCHIVE_MD5, name,
                            hashlib.md5((site / name).read_bytes()).hexdigest())
    task = _task("gtsrb", tmp_path / "gtsrb", download=True)
    assert len(task.train) == 6 and task.test.labels.tolist() == [0, 1, 2, 0]
    assert (tmp_path / "gtsrb" / "GTSRB" / "Final_Test" / "GT-final_test.csv").is_file()


def test_safe_extract_zip_refuses_escapes_and_bad_crc(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(DataError, match="unsafe path"):
        safe_extract_zip(evil, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as zf:  # stored, so the payload bytes are in the file
        zf.writestr("a.txt", "payload-payload")
    damaged.write_bytes(damaged.read_bytes().replace(b"payload-payload", b"payload-PAYLOAD"))
    with pytest.raises(DataError) as exc:
        safe_extract_zip(damaged, tmp_path / "out")
    assert "CRC" in _one_line(exc)


# --- end to end: one epoch of `backdoors train` on each fake set ----------------------------

def _config(name: str, root: Path, **task: Any) -> dict[str, Any]:
    return {"name": name, "seed": 0,
            "task": {"name": name, "data_dir": str(root), **task},
            "model": {"name": "tiny_cnn", "width": 4},
            "train": {"epochs": 1, "batch_size": 4, "lr": 0.05, "tensorboard": False,
                      "progress": False},
            "synthesizer": {"name": "pattern", "target": 1},
            "attack": {"name": "data", "ratio": 0.25}}


@pytest.mark.parametrize("name, write, task", [
    ("gtsrb", write_gtsrb, {"size": 16}),
    ("cifar100", write_cifar100, {"label": "coarse"}),
    ("tiny_imagenet", write_tiny, {}),
])
def test_each_task_trains_end_to_end(tmp_path: Path, name: str, write: Any,
                                     task: dict[str, Any], one_thread: Any) -> None:
    write(tmp_path / "data")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(name, tmp_path / "data", **task)))
    assert main(["train", str(path), "--out", str(tmp_path / "runs"), "--name", "r",
                 "--quiet"]) == 0
    summary = yaml.safe_load((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["status"] == "completed"
