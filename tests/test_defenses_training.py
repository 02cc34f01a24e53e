"""ASD and DBD: the maths they share (symmetric cross-entropy, MixMatch's sharpening, mixup
and loss, SimCLR's views and NT-Xent) on hand-made inputs, their schedules and option
checks, and what each does to small finished attack runs."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from backdoors.assembly.defending import defend
from backdoors.config import TrainConfig, from_dict
from backdoors.data.dataset import ArrayDataset
from backdoors.defenses import DEFENSES
from backdoors.defenses.asd import (
    AdaptiveSplit,
    class_quota,
    class_rank,
    deep_parameters,
    meta_split,
    seed_pool,
)
from backdoors.defenses.base import DefenseData
from backdoors.defenses.dbd import DecouplingDefense
from backdoors.defenses.progress import Progress
from backdoors.defenses.sce import symmetric_cross_entropy
from backdoors.defenses.semi import batches, mixmatch_loss, mixup, rampup, sharpen
from backdoors.defenses.simclr import (
    _hsv_to_rgb,
    _rgb_to_hsv,
    color_jitter,
    gaussian_blur,
    grayscale,
    nt_xent,
    random_resized_crop,
    simclr_view,
)
from backdoors.defenses.target import TrainingBudget
from backdoors.experiment import run
from backdoors.models import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

LOG_1E4 = -math.log(1e-4)


# -- symmetric cross-entropy ------------------------------------------------------------------


def test_sce_of_an_undecided_prediction_is_alpha_ce_plus_half_of_the_rce_cap():
    loss = symmetric_cross_entropy(torch.zeros(1, 2), torch.tensor([0]), 0.1, 1.0)
    assert loss.item() == pytest.approx(0.1 * math.log(2) + 0.5 * LOG_1E4, rel=1e-5)


def test_sce_is_near_zero_when_sure_and_right_and_near_the_cap_when_sure_and_wrong():
    logits = torch.tensor([[30.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
    right, wrong = symmetric_cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    assert right.item() < 1e-4
    # CE of the wrong label is 30; RCE is bounded by -log(1e-4) whatever the confidence
    assert wrong.item() == pytest.approx(0.1 * 30 + LOG_1E4, rel=1e-4)


def test_sce_weights_and_reductions():
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(symmetric_cross_entropy(logits, labels, 1.0, 0.0, "none"), ce)
    per_row = symmetric_cross_entropy(logits, labels, reduction="none")
    assert symmetric_cross_entropy(logits, labels).item() == pytest.approx(per_row.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        symmetric_cross_entropy(logits, labels, reduction="sum")


# -- MixMatch -----------------------------------------------------------------------------------


def test_sharpen_lowers_entropy_and_keeps_rows_distributions():
    p = torch.tensor([[0.6, 0.4], [0.25, 0.75]])
    sharp = sharpen(p, 0.5)
    assert torch.allclose(sharp[0], torch.tensor([0.36, 0.16]) / 0.52)
    assert torch.allclose(sharp.sum(1), torch.ones(2))
    assert torch.allclose(sharpen(p, 1.0), p)
    assert sharpen(p, 0.01)[1].argmax() == 1 and sharpen(p, 0.01)[1, 1] > 0.999


def test_mixup_keeps_each_row_closer_to_itself():
    x, y = torch.tensor([[0.0], [1.0]]), torch.eye(2)
    for lam in (0.3, 0.7):  # lambda' = max(lambda, 1 - lambda) = 0.7 either way
        mx, my = mixup(x, y, lam, torch.tensor([1, 0]))
        assert torch.allclose(mx, torch.tensor([[0.3], [0.7]]))
        assert torch.allclose(my, torch.tensor([[0.7, 0.3], [0.3, 0.7]]))


def test_mixmatch_loss_is_soft_cross_entropy_and_squared_error():
    lx, lu = mixmatch_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]),
                           torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert lx.item() == pytest.approx(math.log(2))
    assert lu.item() == pytest.approx(0.25)  # ((0.5 - 1)^2 + 0.5^2) / 2 classes


def test_rampup_is_linear_then_flat():
    assert rampup(0.5, 2) == 0.25 and rampup(3, 2) == 1.0 and rampup(1, 0) == 1.0


def test_batches_cycle_without_repeats_within_a_pass():
    g = torch.Generator().manual_seed(0)
    stream = batches(5, 2, g)
    first = torch.cat([next(stream), next(stream)])
    assert len(first.unique()) == 4  # the fifth sample waits for the next pass
    assert len(next(batches(3, 8, g))) == 3  # a pool smaller than the batch is one batch


# -- SimCLR ---------------------------------------------------------------------------------------


def test_nt_xent_matches_the_hand_computed_value():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # each anchor: its partner at similarity 1, two others at 0 -> -log(e / (e + 2))
    assert nt_xent(z, z, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    assert nt_xent(3 * z, z, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


def test_nt_xent_prefers_aligned_views():
    z1 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    assert nt_xent(z1, z1 + 0.1 * noise, 0.5) < nt_xent(z1, noise, 0.5)
    assert nt_xent(z1, z1, 0.1) < nt_xent(z1, z1, 1.0)  # a low temperature sharpens


def test_full_crop_without_flip_is_the_identity_and_a_flip_mirrors():
    x = torch.rand(4, 3, 8, 8)
    same = random_resized_crop(x, scale=(1, 1), ratio=(1, 1), flip=False)
    assert torch.allclose(same, x, atol=1e-5)
    out = random_resized_crop(x, scale=(1, 1), ratio=(1, 1),
                              generator=torch.Generator().manual_seed(0))
    for i in range(4):
        assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(out[i], x[i].flip(2),
                                                                          atol=1e-5)


def test_colour_operations():
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    gray = grayscale(x)
    assert torch.allclose(gray[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    assert torch.equal(gray[:, 0], gray[:, 2])
    one = torch.rand(2, 1, 6, 6)
    assert torch.equal(grayscale(one), one)
    assert torch.allclose(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    hsv = _rgb_to_hsv(red)
    hsv[:, 0] += 1 / 3  # a third of a turn: red -> green
    assert torch.allclose(_hsv_to_rgb(hsv), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1),
                          atol=1e-5)
    assert torch.allclose(color_jitter(x, 0, 0, 0, 0), x, atol=1e-5)


def test_blur_keeps_flat_images_and_smooths_an_impulse():
    flat = torch.full((2, 1, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat), flat, atol=1e-6)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    out = gaussian_blur(impulse, sigma=(1.0, 1.0))
    assert out.sum().item() == pytest.approx(1.0, rel=1e-5) and out.max() < 0.5
    assert torch.allclose(out[0, 0], out[0, 0].T, atol=1e-6)  # the same in both directions


def test_simclr_views_differ_and_stay_images():
    x = torch.rand(6, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    a, b = simclr_view(x, g), simclr_view(x, g)
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, b)


# -- ASD and DBD pieces -------------------------------------------------------------------


def test_class_rank_ranks_within_each_class():
    rank = class_rank(torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0]), torch.tensor([0, 0, 1, 1, 0]), 2)
    assert rank.tolist() == [1, 0, 0, 1, 2]


def test_class_quota_grows_as_the_papers_schedule():
    # the paper's code: 60 class-aware epochs, 10 more per class every 5 epochs
    quota = [class_quota(e, 60, 10) for e in range(60)]
    assert quota[0] == quota[4] == 0 and quota[5] == 10 and quota[59] == 110
    assert [class_quota(e, 3, 10) for e in range(3)] == [0, 40, 80]  # 12 steps in 3 epochs


def test_meta_split_keeps_the_samples_whose_loss_fell_least():
    before = torch.tensor([1.0, 1.0, 2.0, 0.5])
    after = torch.tensor([0.9, 0.1, 2.0, 0.3])  # the second fell most: learned fastest
    drop, pool = meta_split(before, after, 0.5)
    assert torch.allclose(drop, torch.tensor([0.1, 0.9, 0.0, 0.2]))
    assert pool.tolist() == [True, False, True, False]  # the highest loss (2.0) is kept


def test_seed_pool_takes_so_many_per_class():
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 6)
    clean = ArrayDataset(torch.zeros(13, 1, 2, 2, dtype=torch.uint8), labels)
    seeds = seed_pool(clean, 3, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(seeds.labels, minlength=3).tolist() == [3, 2, 3]


def _model(name: str, shape: tuple[int, int, int], classes: int = 10, **kw: Any
           ) -> torch.nn.Module:
    return MODELS.build(name, kw, "model", num_classes=classes, input_shape=shape,
                        mean=(0.5,) * shape[0], std=(0.5,) * shape[0])


def test_meta_split_updates_the_deeper_half_as_the_paper_does():
    resnet = _model("resnet18", (3, 32, 32), width=4)
    expected = {id(p) for m in (resnet.body.layer3, resnet.body.layer4, resnet.head)
                for p in m.parameters()}
    assert {id(p) for p in deep_parameters(resnet)} == expected
    net = _model("simple_net", (1, 28, 28))
    conv2 = [m for m in net.body if isinstance(m, torch.nn.Conv2d)][1]
    expected = {id(p) for m in (conv2, net.pool, net.head) for p in m.parameters()}
    assert {id(p) for p in deep_parameters(net)} == expected


def test_stage_lengths_follow_the_papers_ratios():
    assert AdaptiveSplit().stages(120) == (60, 30, 30)
    assert AdaptiveSplit().stages(5) == (3, 1, 1)
    assert AdaptiveSplit(class_aware_epochs=1, class_agnostic_epochs=0).stages(4) == (1, 0, 3)
    assert DecouplingDefense().phases(200) == (100, 10, 190)
    assert DecouplingDefense().phases(5) == (3, 1, 4)
    assert DecouplingDefense(self_epochs=0, warmup_epochs=2).phases(5) == (0, 2, 3)


@pytest.mark.parametrize(("name", "options"), [
    ("asd", {"epsilon": 1.0}), ("asd", {"seed_num": 0}), ("asd", {"meta_lr": 0.0}),
    ("asd", {"class_aware_epochs": -1}), ("dbd", {"epsilon": 0.0}),
    ("dbd", {"self_epochs": -1}), ("dbd", {"self_batch_size": 1}), ("dbd", {"iterations": 0}),
])
def test_bad_options_are_refused(name, options):
    with pytest.raises(ValueError):
        DEFENSES.get(name)(**options)


class _Phases(Progress):
    """Records the phases a defense announces (what a terminal would show as bars)."""

    def __init__(self) -> None:
        super().__init__("test", enabled=False)
        self.seen: list[tuple[str, int]] = []

    def phase(self, items, what, total=None):
        items = list(items)
        self.seen.append((what, len(items)))
        return iter(items)


def _tiny(progress: Progress) -> DefenseData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=g)
    train = ArrayDataset(images, torch.arange(48) % 4)
    return DefenseData(clean=train.subset(slice(0, 16)), num_classes=4, input_shape=(1, 8, 8),
                       device=torch.device("cpu"), generator=g, train=train, batch_size=16,
                       progress=progress)


@pytest.mark.parametrize(("name", "options", "expected"), [
    ("asd", {"iterations": 1}, [("class-aware split + MixMatch epochs", 2),
                                ("class-agnostic split + MixMatch epochs", 1),
                                ("meta-split + MixMatch epochs", 1),
                                ("training the virtual model", 1)]),
    ("dbd", {"iterations": 1, "self_batch_size": 16, "self_epochs": 2},
     [("SimCLR pre-training (no labels)", 2), ("linear head warm-up (frozen backbone)", 1),
      ("MixMatch fine-tuning", 3)]),
])
def test_each_phase_shows_its_epochs(name, options, expected):
    progress = _Phases()
    model = _model("tiny_cnn", (1, 8, 8), 4, width=4)
    budget = TrainingBudget(TrainConfig(epochs=4, batch_size=16))
    trained = DEFENSES.get(name)(**options).train(model, _tiny(progress), budget)
    assert sorted(progress.seen) == sorted(expected)
    assert trained.flagged is not None and 0 < int(trained.flagged.sum()) < 48


# -- behaviour on a small finished attack run ---------------------------------------------------

# The synthetic task (4 blob classes, 1,024 training images, tiny_cnn) with 10% of the
# training set poisoned by the pattern trigger, relabelled 1.
ATTACK: dict[str, Any] = {
    "name": "g5", "seed": 0, "task": {"name": "synthetic"},
    "train": {"epochs": 4, "lr": 0.05, "tensorboard": False, "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("g5")
    run(from_dict(copy.deepcopy(ATTACK)), out=out, name="run", quiet=True)
    return out / "run"


def _removes_the_backdoor(result: dict[str, Any]) -> None:
    before, after = result["before"], result["after"]
    assert before["asr"] > 0.9 and after["asr"] < 0.2
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.05
    assert result["isolated_recall"] > 0.7  # most poison is kept out of the labelled pool


def test_asd_keeps_the_poison_out_of_its_clean_pool_and_the_backdoor_out(attack_run):
    result = defend(attack_run, "asd", {})
    _removes_the_backdoor(result)
    assert result["stage_epochs"] == [2, 1, 1] and result["seeds"] == 40  # 10 per class
    poison_rate = 0.1
    for stage in ("class_aware", "class_agnostic", "meta"):
        assert result[f"{stage}_pool_poisoned"] < poison_rate / 2 * result[f"{stage}_pool"]
    assert len(result["pool_poisoned_per_epoch"]) == len(result["pool_size_per_epoch"]) == 4
    assert (attack_run / "defenses" / "asd" / "poisoned_in_clean_pool.png").is_file()


# DBD needs a task SimCLR can learn from without labels: the blob task's classes are
# positions, which random crops move (docs/defenses_training.md), so DBD meets scikit-learn's
# 8x8 digits with a single-pixel trigger (relabelled 1), trained long enough (8 epochs of
# 42 steps) for its head to be fitted in a few epochs.
DIGITS: dict[str, Any] = {
    "name": "digits", "seed": 0, "task": {"name": "digits"},
    "train": {"epochs": 8, "lr": 0.05, "batch_size": 32, "tensorboard": False,
              "progress": False},
    "synthesizer": {"name": "single_pixel", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}
DBD_DIGITS = {"self_epochs": 10, "self_batch_size": 128, "warmup_epochs": 4, "iterations": 21}


def test_dbd_trusts_few_poisoned_samples_and_unlearns_the_trigger(tmp_path):
    run(from_dict(copy.deepcopy(DIGITS)), out=tmp_path, name="digits", quiet=True)
    result = defend(tmp_path / "digits", "dbd", DBD_DIGITS)
    assert result["phase_epochs"] == [10, 4, 4] and result["clean_samples"] == 0
    assert result["before"]["asr"] > 0.9 and result["after"]["asr"] < 0.2
    poison_rate = 0.1
    for stage in ("split", "finetune"):  # the head's split, and the last one
        assert result[f"{stage}_pool_poisoned"] < poison_rate / 2 * result[f"{stage}_pool"]
    assert result["isolated_recall"] > 0.7
    # Clean accuracy is not kept here: a few hundred head steps on 8x8 SimCLR features
    # leave whole classes out of the lowest-loss half (docs/defenses_training.md); the slow
    # test below checks it on MNIST.


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize(("name", "options"), [("asd", {}), ("dbd", {"self_epochs": 10})])
def test_the_issue_bar_on_mnist_badnets(name, options, shared_data, tmp_path):
    """ASR below 20% at a cost of at most 5 points of clean accuracy, on half the project's
    MNIST split (4,000 training images) with BadNets at 10%, simple_net, 4 epochs."""
    config = {
        "name": "mnist", "seed": 1, "model": {"name": "simple_net"},
        "task": {"name": "mnist", "data_dir": str(shared_data / "mnist-t10k"),
                 "test_split": 8000, "max_train_samples": 4000, "max_test_samples": 1000},
        "train": {"epochs": 4, "lr": 0.01, "scheduler": "cosine", "tensorboard": False,
                  "progress": False},
        "synthesizer": {"name": "pattern", "target": 0},
        "attack": {"name": "data", "ratio": 0.1},
    }
    run(from_dict(config), out=tmp_path, name="mnist", quiet=True)
    result = defend(tmp_path / "mnist", name, options)
    _removes_the_backdoor(result)
