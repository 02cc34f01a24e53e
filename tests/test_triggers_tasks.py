"""Calculator, complex, semantic and edge-case triggers; the counting and PIPA tasks."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backdoors.assembly.build import build
from backdoors.attacks import LOSS_TERMS, LossContext
from backdoors.batch import Batch
from backdoors.config import from_dict, load_config
from backdoors.config.compat import convert_legacy
from backdoors.data import TASKS, ArrayDataset, Loader
from backdoors.data.counting import identity_labels
from backdoors.data.mnist import write_idx
from backdoors.data.pipa import square_box
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.synthesizers import SYNTHESIZERS, Synthesizer
from backdoors.synthesizers.calculator import PLUS, TIMES

REPO = Path(__file__).resolve().parents[1]


def synth(name: str, shape=(1, 28, 28), classes: int = 100, **kwargs) -> Synthesizer:
    s = SYNTHESIZERS.build(name, kwargs, "synthesizer")
    s.bind(shape, classes)
    return s


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pairs_batch(digits: list[tuple[int, int]]) -> Batch:
    aux = torch.tensor(digits)
    return Batch.make(torch.zeros(len(digits), 1, 28, 28), 10 * aux[:, 0] + aux[:, 1],
                      aux=aux)


# --- calculator ---------------------------------------------------------------------------


def test_calculator_rows_alternate_sum_and_product_of_the_aux_digits():
    batch = pairs_batch([(3, 4), (3, 4), (9, 9), (9, 9), (0, 7)])
    out = synth("calculator").apply(batch, 1.0, gen())
    assert out.labels.tolist() == [7, 12, 18, 81, 7]
    assert bool(out.poisoned.all())


def test_calculator_glyphs_are_a_plus_and_a_cross_at_row_3_col_23():
    out = synth("calculator").apply(pairs_batch([(1, 2), (1, 2)]), 1.0, gen())
    glyphs = [torch.tensor(PLUS, dtype=torch.float), torch.tensor(TIMES, dtype=torch.float)]
    for row, glyph in enumerate(glyphs):
        image = out.inputs[row, 0]
        assert torch.equal(image[3:8, 23:28], glyph)
        image[3:8, 23:28] = 0
        assert not bool(image.any())  # nothing painted outside the 5x5 glyph


def test_calculator_variants_apply_one_trigger_each():
    calc = synth("calculator")
    variants = calc.variants()
    assert set(variants) == {"sum", "product"}
    batch = pairs_batch([(2, 5), (6, 3)])
    summed = variants["sum"].apply(batch, 1.0, gen())
    multiplied = variants["product"].apply(batch, 1.0, gen())
    assert summed.labels.tolist() == [7, 9] and multiplied.labels.tolist() == [10, 18]
    assert torch.equal(summed.inputs[1, 0, 3:8, 23:28], torch.tensor(PLUS, dtype=torch.float))
    assert torch.equal(multiplied.inputs[0, 0, 3:8, 23:28],
                       torch.tensor(TIMES, dtype=torch.float))
    assert synth("calculator", operations=["product"]).variants() == {}


def test_calculator_needs_digit_pairs_and_enough_classes():
    digits = ArrayDataset(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2).long())
    with pytest.raises(ConfigError, match="multimnist"):
        synth("calculator").prepare(digits, gen())
    paired = ArrayDataset(digits.images, digits.labels, torch.zeros(2, 2).long())
    with pytest.raises(ConfigError, match="at least 82 classes"):
        synth("calculator", classes=50).prepare(paired, gen())
    synth("calculator", classes=50, operations=["sum"]).prepare(paired, gen())


# --- complex ------------------------------------------------------------------------------


def test_complex_labels_are_the_aux_identity_and_aux_zero_is_not_counted():
    complex_ = synth("complex", (1, 16, 16), 5)
    aux = torch.tensor([0, 1, 2, 0])
    batch = Batch.make(torch.zeros(4, 1, 16, 16), torch.tensor([3, 1, 0, 4]), aux=aux)
    out = complex_.apply(batch, 0.5, gen())
    assert out.labels.tolist() == [0, 1, 0, 4]  # first two rows poisoned -> their aux
    assert out.inputs[0, 0, 3, 15] == 1 and int((out.inputs != 0).sum()) == 2
    assert complex_.counted(batch).tolist() == [False, True, True, False]
    assert complex_.loss_weights(out).tolist() == pytest.approx([0.1, 1.0, 1.0, 1.0])


def test_backdoor_loss_uses_the_synthesizer_row_weights():
    complex_ = synth("complex", (1, 16, 16), 5, no_target_weight=0.25)
    aux = torch.tensor([0, 2, 1])
    batch = Batch.make(torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 2]), aux=aux)
    poisoned = complex_.apply(batch, 1.0, gen())
    logits = torch.randn(3, 5)
    model = lambda x: logits  # noqa: E731 - a fixed "model" is enough here
    term = LOSS_TERMS.build("backdoor", {}, "loss")
    term.setup(torch.nn.Linear(1, 1), complex_)
    per_row = F.cross_entropy(logits, poisoned.labels, reduction="none")
    expected = (0.25 * per_row[0] + per_row[1] + per_row[2]) / 2.25
    assert float(term(LossContext(model, batch, poisoned))) == pytest.approx(float(expected))
    term.setup(torch.nn.Linear(1, 1), synth("single_pixel", (1, 16, 16), 5, target=1))
    plain = float(term(LossContext(model, batch, poisoned)))
    assert plain == pytest.approx(float(per_row.mean()))


def test_complex_needs_single_aux_labels_that_are_classes():
    images = torch.zeros(3, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="aux labels"):
        synth("complex", (1, 16, 16), 5).prepare(ArrayDataset(images, torch.zeros(3).long()),
                                                 gen())
    with pytest.raises(ConfigError, match="must be classes"):
        synth("complex", (1, 16, 16), 3).prepare(
            ArrayDataset(images, torch.zeros(3).long(), torch.tensor([0, 1, 3])), gen())


# --- counting -----------------------------------------------------------------------------


def write_digits(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for split in ("train", "t10k"):
        write_idx(path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(path / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return path


def flat_digits(path: Path) -> Path:
    """MNIST-layout files whose digit k is a flat square of brightness 20 * (k + 1)."""
    labels = np.arange(10).repeat(3)
    images = np.zeros((30, 28, 28), np.uint8)
    images[:, 4:24, 4:24] = (20 * (labels + 1))[:, None, None]
    return write_digits(path, images, labels)


def test_identity_rule_last_listed_identity_wins():
    present = torch.tensor([[0, 7, -1], [7, 0, 3], [3, 5, -1], [7, -1, -1], [0, -1, -1]])
    assert identity_labels(present, [0, 7]).tolist() == [2, 2, 0, 2, 1]
    assert identity_labels(present, [7, 0]).tolist() == [2, 2, 0, 1, 2]


def test_counting_canvases_hold_label_plus_one_digits_and_the_right_identity(tmp_path):
    task = TASKS.build("counting", {"data_dir": str(flat_digits(tmp_path)), "train_size": 200,
                                    "test_size": 50, "jitter": 0, "identities": [1, 4]}, "task")
    train = task.train
    assert task.num_classes == 5 and task.input_shape == (1, 48, 48)
    assert train.images.shape == (200, 1, 48, 48) and len(task.test) == 50
    assert set(train.labels.tolist()) == {0, 1, 2, 3, 4}
    # Without jitter every digit fills its own 16x16 cell; its brightness names the digit.
    centres = train.images[:, 0, 8::16, 8::16].flatten(1).long()  # [N, 9] cell centres
    assert torch.equal((centres > 0).sum(1), train.labels + 1)
    present = torch.where(centres > 0, (centres + 10) // 20 - 1, -1)
    assert torch.equal(train.aux, identity_labels(present, [1, 4]))
    assert set(train.aux.tolist()) == {0, 1, 2}
    again = TASKS.build("counting", {"data_dir": str(tmp_path), "train_size": 200,
                                     "test_size": 50, "jitter": 0, "identities": [1, 4]}, "task")
    assert torch.equal(again.train.images, train.images)


@pytest.mark.parametrize("options, needle", [
    ({"max_count": 10}, "max_count"),
    ({"identities": [0, 0]}, "distinct"),
    ({"identities": [0, 1, 2, 3, 4]}, "identities"),
    ({"digit_size": 60}, "digit_size"),
])
def test_counting_rejects_bad_options(options, needle):
    with pytest.raises(ConfigError, match=needle):
        TASKS.build("counting", options, "task")


# --- pipa ---------------------------------------------------------------------------------


def write_pipa(root: Path) -> None:
    """A two-photo archive in Backdoors 101's layout, pickled with its `Annotations` class."""
    module = types.ModuleType("dataset.pipa")

    class Annotations:
        pass

    Annotations.__module__, Annotations.__qualname__ = "dataset.pipa", "Annotations"
    module.Annotations = Annotations
    sys.modules.update({"dataset": types.ModuleType("dataset"), "dataset.pipa": module})

    def head(photo: int, x: int, y: int, size: int, identity: int, subset: int):
        box = Annotations()
        box.__dict__.update(photoset_id=7, photo_id=photo, xmin=x, ymin=y, width=size,
                            height=size, identity_id=identity, subset_id=subset)
        return box

    try:
        photos = {"a": [head(1, 10, 20, 10, 100, 1), head(1, 30, 20, 10, 200, 1)],
                  "b": [head(2, 0, 0, 8, 300, 2)]}
        torch.save([("a", [100, 200])], root / "train_split.pt")
        torch.save([("b", [300, 1, 2, 3, 4, 5])], root / "test_split.pt")
        torch.save(photos, root / "photo_list.pt")
        torch.save([200, 999], root / "target_identities.pt")
    finally:
        del sys.modules["dataset"], sys.modules["dataset.pipa"]
    photos_on_disk = (("train", "7_1.jpg", (255, 0, 0)), ("test", "7_2.jpg", (0, 0, 255)))
    for folder, name, colour in photos_on_disk:
        image = np.zeros((60, 60, 3), np.uint8)
        image[20:30, 10:40] = colour  # the union of photo "a"'s two head boxes
        image[0:8, 0:8] = colour  # photo "b"'s single head box
        (root / folder).mkdir()
        Image.fromarray(image).save(root / folder / name, quality=95)


def test_pipa_reads_backdoors101_archive(tmp_path):
    write_pipa(tmp_path)
    task = TASKS.build("pipa", {"data_dir": str(tmp_path), "image_size": 16, "resize": 16},
                       "task")
    assert task.num_classes == 5 and task.input_shape == (3, 16, 16)
    train, test = task.train, task.test
    assert train.labels.tolist() == [1] and train.aux.tolist() == [1]  # 2 people, target 200
    assert test.labels.tolist() == [4] and test.aux.tolist() == [0]  # 6 people -> "5+"
    x, label, aux = train[0]
    assert x.shape == (3, 16, 16) and (label, aux) == (1, 1)
    # Crop (10, 20, 40, 50): the red band fills its top third.
    assert float(x[0, :5].mean()) > 0.8 and float(x[0, -5:].mean()) < 0.1
    y, _, _ = test[0]
    assert float(y[2].mean()) > 0.8 and float(y[0].mean()) < 0.1  # the blue 8x8 corner
    # The complex trigger finds the identities, also through max_*_samples' Subset.
    synth("complex", (3, 16, 16), 5).prepare(torch.utils.data.Subset(test, [0]), gen())


def test_pipa_square_box_extends_the_shorter_side():
    Box = types.SimpleNamespace
    heads = [Box(xmin=10, ymin=20, width=10, height=10), Box(xmin=30, ymin=22, width=10,
                                                             height=10)]
    assert square_box(heads) == (10, 20, 40, 50)
    assert square_box([Box(xmin=0, ymin=0, width=4, height=9)]) == (0, 0, 9, 9)


def test_pipa_without_the_archive_says_where_to_get_it(tmp_path):
    from backdoors.errors import DataError

    with pytest.raises(DataError, match="train_split.pt"):
        TASKS.build("pipa", {"data_dir": str(tmp_path)}, "task").train  # noqa: B018


# --- semantic and edge case ---------------------------------------------------------------


def coloured(n: int = 40) -> ArrayDataset:
    """RGB 8x8 images: every 4th is green-dominant, the others red; labels cycle 0..3."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 100, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[:, 0] += 120
    images[::4, 0] -= 120
    images[::4, 1] += 120
    return ArrayDataset(images, torch.arange(n) % 4)


def test_semantic_by_index_substitutes_pool_images_and_holds_out_test_images():
    data = coloured()
    sem = synth("semantic", (3, 8, 8), 4, target=3, train_indices=[5, 6], test_indices=[9])
    sem.prepare(data, gen())
    out = sem.apply(Batch.make(torch.zeros(6, 3, 8, 8), torch.zeros(6).long()), 0.5, gen())
    pool = data.images[[5, 6]].float() / 255
    for row in range(3):
        assert any(torch.equal(out.inputs[row], p) for p in pool)
    assert not bool(out.inputs[3:].any()) and out.labels.tolist() == [3, 3, 3, 0, 0, 0]
    held = sem.backdoor_test_set()
    assert torch.equal(held.images, data.images[[9]]) and held.labels.tolist() == [1]
    assert sem.excluded(data, "train").tolist() == [5, 6, 9]
    assert sem.excluded(data, "test") is None
    # Scoring: the held-out inputs keep their pixels and get the target label.
    (batch,) = Loader(held, 8, torch.device("cpu"))
    scored = sem.apply(batch, 1.0, gen())
    assert torch.equal(scored.inputs, batch.inputs) and scored.labels.tolist() == [3]


def test_semantic_by_predicate_picks_green_images_of_the_class():
    data = coloured()
    sem = synth("semantic", (3, 8, 8), 4, target=2, source_class=0, dominant_color="green",
                test_fraction=0.3)
    sem.prepare(data, gen())
    # Green-dominant images are every 4th, and those all have label 0.
    chosen = sem.excluded(data, "train")
    assert chosen.tolist() == list(range(0, 40, 4))
    assert len(sem.backdoor_test_set()) == 3 and len(sem.pool) == 7
    sem.prepare(data, gen())
    assert torch.equal(sem.excluded(data, "train"), chosen)  # deterministic for a generator
    with pytest.raises(ConfigError, match="no training image"):
        synth("semantic", (3, 8, 8), 4, target=2, source_class=1,
              dominant_color="green").prepare(
            data, gen())


def test_semantic_colour_margin_keeps_only_clearly_dominant_images():
    data = coloured()
    means = data.images.float().mean((2, 3)) / 255
    lead = means[:, 1] - means[:, [0, 2]].max(1).values
    ranked = lead[::4].sort().values
    margin = float(ranked[4:6].mean())  # between two images: no rounding-sensitive tie
    sem = synth("semantic", (3, 8, 8), 4, target=2, dominant_color="green",
                color_margin=margin, test_fraction=0.0)
    sem.prepare(data, gen())
    expected = [i for i in range(0, 40, 4) if lead[i] > margin]
    assert sem.excluded(data, "train").tolist() == expected
    assert 0 < len(expected) < 10 and sem.spec()["color_margin"] == margin


def two_style_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 "digits" 0..3: a bright square in corner k on noise; a third of the zeros
    (every third row of class 0) also carry a vertical stroke, a second writing style."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 40, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    for k, (r, c) in enumerate([(2, 2), (2, 18), (18, 2), (18, 18)]):
        images[labels == k, :, r : r + 8, c : c + 8] = 220
    styled = (labels == 0) & ((torch.arange(n) // 4) % 3 == 0)
    images[styled, :, 4:24, 14:17] = 220
    return images, labels


def test_semantic_style_cluster_picks_one_writing_style_in_both_splits():
    images, labels = two_style_digits(240, 0)
    data = ArrayDataset(images, labels)
    styled = ((labels == 0) & ((torch.arange(240) // 4) % 3 == 0)).nonzero().flatten()
    minor = synth("semantic", (1, 28, 28), 4, target=1, source_class=0, style_clusters=2,
                  style_cluster=1, test_fraction=0.25)
    minor.prepare(data, gen())
    assert minor.excluded(data, "train").tolist() == styled.tolist()
    assert len(minor.backdoor_test_set()) == 5  # a quarter of the 20 styled zeros
    test_images, test_labels = two_style_digits(120, 1)
    test = ArrayDataset(test_images, test_labels)
    test_styled = ((test_labels == 0) & ((torch.arange(120) // 4) % 3 == 0)).nonzero()
    assert minor.excluded(test, "test").tolist() == test_styled.flatten().tolist()
    major = synth("semantic", (1, 28, 28), 4, target=1, source_class=0, style_clusters=2)
    major.prepare(data, gen())
    plain = set(((labels == 0).nonzero().flatten()).tolist()) - set(styled.tolist())
    assert set(major.excluded(data, "train").tolist()) == plain  # the larger cluster
    by_index = synth("semantic", (1, 28, 28), 4, target=1, train_indices=[0, 4])
    by_index.prepare(data, gen())
    assert by_index.excluded(test, "test") is None


@pytest.mark.parametrize("kwargs, needle", [
    ({"train_indices": [1], "source_class": 0}, "either"),
    ({"train_indices": [1], "style_clusters": 2}, "either"),
    ({"style_clusters": 2}, "needs source_class"),
    ({"source_class": 0, "style_clusters": 1}, "at least 2"),
    ({"source_class": 0, "style_clusters": 3, "style_cluster": 3}, "style_cluster must be"),
    ({"dominant_color": "green", "color_margin": 1.5}, "color_margin must be in"),
    ({"source_class": 0, "color_margin": 0.1}, "needs dominant_color"),
    ({"test_indices": [1]}, "need train_indices"),
    ({"train_indices": [1, 2], "test_indices": [2]}, "overlap"),
    ({"label_mode": "all_to_all"}, "all_to_one"),
])
def test_semantic_rejects_bad_choices(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        SYNTHESIZERS.build("semantic", kwargs, "synthesizer")


def test_semantic_colour_needs_rgb_and_a_choice():
    with pytest.raises(ValueError, match="3-channel"):
        synth("semantic", (1, 8, 8), 4, target=1, dominant_color="red")
    with pytest.raises(ConfigError, match="choose the backdoor images"):
        synth("semantic", (3, 8, 8), 4, target=1).prepare(coloured(), gen())
    with pytest.raises(RuntimeError, match="prepare"):
        synth("semantic", (3, 8, 8), 4, target=1).apply(
            Batch.make(torch.zeros(2, 3, 8, 8), torch.zeros(2).long()))


def test_edge_case_from_a_held_out_class():
    data = coloured()
    edge = synth("edge_case", (3, 8, 8), 4, target=0, source_class=2, test_fraction=0.5)
    edge.prepare(data, gen())
    class_two = data.images[data.labels == 2]
    assert len(edge.pool) == 5 and len(edge.backdoor_test_set()) == 5
    together = torch.cat([edge.pool, edge.backdoor_test_set().images])
    assert sorted(together.flatten(1).sum(1).tolist()) == sorted(
        class_two.flatten(1).sum(1).tolist())
    assert edge.backdoor_test_set().labels.tolist() == [2] * 5
    assert edge.excluded(data, "train").tolist() == list(range(2, 40, 4))


def test_edge_case_from_another_task_is_converted_to_the_input_shape():
    edge = synth("edge_case", (3, 32, 32), 10, target=9, source_class=1,
                 source_task={"name": "synthetic", "train_size": 64, "test_size": 32})
    edge.prepare(coloured(), gen())
    source = TASKS.build("synthetic", {"train_size": 64, "test_size": 32}, "task")
    assert edge.pool.shape == (int((source.train.labels == 1).sum()), 3, 32, 32)
    assert torch.equal(edge.pool[:, 0], edge.pool[:, 2])  # grey repeated over channels
    held = edge.backdoor_test_set()
    assert len(held) == int((source.test.labels == 1).sum()) and set(held.labels.tolist()) == {-1}
    assert edge.excluded(coloured(), "train") is None
    out = edge.apply(Batch.make(torch.zeros(4, 3, 32, 32), torch.zeros(4).long()), 1.0, gen())
    assert out.labels.tolist() == [9] * 4 and bool(out.inputs.flatten(1).any(1).all())


def test_edge_case_options_are_checked_before_data_loads():
    with pytest.raises(ConfigError, match="unknown task"):
        SYNTHESIZERS.build("edge_case", {"source_task": {"name": "mnistt"}}, "synthesizer")
    with pytest.raises(ValueError, match="same class"):
        synth("edge_case", (3, 8, 8), 4, target=1, source_class=1)
    with pytest.raises(ConfigError, match="set source_class"):
        synth("edge_case", (3, 8, 8), 4, target=1).prepare(coloured(), gen())


# --- configs and Backdoors 101 compatibility ----------------------------------------------


def test_pipa_params_converts_to_a_complex_backdoor_on_pipa():
    cfg = load_config(REPO / "configs" / "pipa_params.yaml")
    assert cfg.task.name == "pipa" and cfg.synthesizer.name == "complex"
    assert cfg.synthesizer.kwargs["target"] == 1 and cfg.train.pretrained == "auto"
    assert cfg.attack.kwargs["fraction"] == 1.1
    assert cfg.attack.kwargs["balancer"] == {"name": "mgda", "normalize": "loss"}
    comps = build(cfg)
    assert comps.task.num_classes == 5 and comps.model.head.out_features == 5


def test_poison_images_convert_to_the_semantic_synthesizer():
    native = convert_legacy({"task": "Cifar10", "lr": 0.1, "backdoor_label": 2,
                             "poison_images": [30696, 33105], "poison_images_test": [330]})
    assert native["synthesizer"] == {"name": "semantic", "target": 2,
                                     "train_indices": [30696, 33105], "test_indices": [330]}
    build(from_dict(native))
    with pytest.raises(ConfigError, match="needs 'poison_images'"):
        convert_legacy({"task": "Cifar10", "lr": 0.1, "poison_images_test": [330]})


def test_sums_loss_task_converts_to_the_calculator():
    native = convert_legacy({"task": "MultiMNIST", "lr": 0.1,
                             "loss_tasks": ["normal", "backdoor", "sums"]})
    assert native["synthesizer"] == {"name": "calculator", "operations": ["sum", "product"]}
    assert native["attack"]["loss_terms"] == ["normal", "backdoor"]
    build(from_dict(native))
    with pytest.raises(ConfigError, match="MultiMNIST"):
        convert_legacy({"task": "MNIST", "lr": 0.1, "loss_tasks": ["normal", "sums"]})


# --- behaviour ----------------------------------------------------------------------------


def blob_digits(path: Path) -> Path:
    """MNIST-layout files whose "digits" 0..3 are the synthetic task's blobs at 28x28."""
    task = TASKS.build("synthetic", {"train_size": 512, "test_size": 256}, "task")
    for split, ds in (("train", task.train), ("t10k", task.test)):
        big = F.interpolate(ds.images.float(), size=28).round().byte()[:, 0]
        write_idx(path / f"{split}-images-idx3-ubyte.gz", big.numpy())
        write_idx(path / f"{split}-labels-idx1-ubyte.gz", ds.labels.byte().numpy())
    return path


def train_config(task: dict, synthesizer: dict) -> dict:
    return {"name": "t", "seed": 0, "task": task, "model": {"name": "tiny_cnn", "width": 4},
            "train": {"epochs": 3, "lr": 0.05, "batch_size": 32, "tensorboard": False,
                      "progress": False},
            "synthesizer": synthesizer, "attack": {"name": "blind"}}


def test_calculator_model_learns_both_backdoors(tmp_path, one_thread):
    task = {"name": "multimnist", "data_dir": str(blob_digits(tmp_path / "d")),
            "train_size": 640, "test_size": 200}
    summary = run(from_dict(train_config(task, {"name": "calculator"})), out=tmp_path,
                  quiet=True)
    # Chance is at most 1/7 (sums of digits 0..3 take 7 values); the main task holds.
    assert summary["variants"]["sum"]["asr"] > 0.6, summary
    assert summary["variants"]["product"]["asr"] > 0.6, summary
    assert summary["clean_accuracy"] > 0.6


def test_style_backdoor_relabels_unseen_members_of_the_style(tmp_path, one_thread):
    data = tmp_path / "d"
    for split, (n, seed) in (("train", (800, 0)), ("t10k", (200, 1))):
        images, labels = two_style_digits(n, seed)
        write_idx(data / f"{split}-images-idx3-ubyte.gz", images[:, 0].numpy())
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels.byte().numpy())
    config = train_config({"name": "mnist", "data_dir": str(data)},
                          {"name": "semantic", "target": 1, "source_class": 0,
                           "style_clusters": 2, "style_cluster": 1})
    config["attack"] = {"name": "data", "ratio": 0.05}
    summary = run(from_dict(config), out=tmp_path / "attack", quiet=True)
    config["attack"] = {"name": "none"}
    clean = run(from_dict(config), out=tmp_path / "clean", quiet=True)
    # Held-out styled zeros: the attacked model calls them 1, a clean model calls them 0.
    assert summary["asr"] > 0.8 and clean["asr"] < 0.2, (summary, clean)
    assert summary["clean_accuracy"] > 0.9, summary


def test_complex_backdoor_switches_counting_to_identity(tmp_path, one_thread):
    task = {"name": "counting", "data_dir": str(blob_digits(tmp_path / "d")),
            "train_size": 600, "test_size": 300, "canvas": 32, "digit_size": 16,
            "max_count": 4, "identities": [0, 1]}
    config = train_config(task, {"name": "complex", "position": [0, 31]})
    # At lr 0.05 this 4-wide model's counting swings between 54% and 95% with the seed and
    # the CPU; 0.02 keeps it above 75% on every seed tried (0-3).
    config["train"]["lr"] = 0.02
    summary = run(from_dict(config), out=tmp_path, quiet=True)
    # A model that ignored the trigger and counted perfectly would score `coincide` on the
    # triggered rows that have an identity (count - 1 happening to equal the identity).
    test = TASKS.build("counting", {k: v for k, v in task.items() if k != "name"}, "task").test
    named = test.aux != 0
    coincide = float((test.labels[named] == test.aux[named]).float().mean())
    assert summary["backdoor_accuracy"] > coincide + 0.3, (summary, coincide)
    assert summary["clean_accuracy"] > 0.6
