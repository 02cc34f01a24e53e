"""Defenses: contract tests over the registry, behaviour on small finished attack runs, and
unit tests of the maths on hand-made inputs."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from backdoors.assembly.artifact import reopen
from backdoors.assembly.defending import defend, defense_key
from backdoors.config import Component, from_dict
from backdoors.data.dataset import ArrayDataset
from backdoors.defenses import (
    DEFENSES,
    DatasetSanitizer,
    DefenseData,
    DefenseTarget,
    InputDetector,
    ModelInspector,
    ModelRepair,
    TrainingDefense,
)
from backdoors.defenses.fine_pruning import ChannelMask, FinePruning, prune
from backdoors.defenses.neural_cleanse import flag_small, stamp
from backdoors.defenses.runner import clean_budget
from backdoors.defenses.scores import anomaly_index
from backdoors.defenses.spectral_signatures import SpectralSignatures, spectral_scores
from backdoors.defenses.strip import Strip
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")

# The attack every defense meets: the synthetic task, 10% data poisoning with the pattern
# trigger (target 1).
SYNTHETIC: dict[str, Any] = {
    "name": "defended", "seed": 0, "task": {"name": "synthetic"},
    "train": {"epochs": 4, "lr": 0.05, "tensorboard": False, "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}
# Neural Cleanse needs enough classes for a median and classes about equally hard to
# reach: on the 4 blob classes the pattern's target passes index 2 only narrowly (2.5 at
# 300 steps; the cheapest blob class needs a mask about twice the pattern's). It meets a
# single-pixel trigger on the 10 digits, and a clean digits model.
DIGITS: dict[str, Any] = {
    "name": "digits", "seed": 0, "task": {"name": "digits"},
    "train": {"epochs": 4, "lr": 0.05, "batch_size": 32, "tensorboard": False,
              "progress": False},
    "synthesizer": {"name": "single_pixel", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}
TARGET = 1
# Options for the runs below, kept small for speed; a defense without a case runs with
# its defaults. ICA hides the poison direction of this small model (see docs/defenses.md).
CASES: dict[str, dict[str, Any]] = {
    "activation_clustering": {"reduction": "pca"},
    "neural_cleanse": {"steps": 30},
    "sentinet": {"n": 4},
    "anp": {"iterations": 30},
    "i_bau": {"rounds": 2, "perturbation_steps": 10},
    "rnp": {"unlearning_epochs": 2, "recovering_epochs": 2},
    "ft_sam": {"epochs": 2},
    "sau": {"epochs": 1},
    "npd": {"epochs": 1},
    "bti_dbf": {"rounds": 1, "mask_epochs": 1, "generator_epochs": 1, "unlearn_epochs": 1,
                "generator_width": 4, "generator_levels": 2},
    "mm_bd": {"starts": 5, "steps": 50},
    "spectre": {"k": 4},
    "teco": {"corruptions": ["gaussian_noise", "defocus_blur", "contrast", "jpeg_compression"]},
    "cognitive_distillation": {"steps": 10},
    "asd": {"iterations": 4},
    "dbd": {"self_epochs": 1, "self_batch_size": 64, "iterations": 4},
}
NEURAL_CLEANSE = {"steps": 100}

Defended = Callable[[str], dict[str, Any]]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(cfg: dict[str, Any], out: Path, name: str, **changes: Any) -> Path:
    cfg = copy.deepcopy(cfg)
    cfg.update(changes)
    run(from_dict(cfg), out=out, name=name, quiet=True)
    return out / name


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(SYNTHETIC, tmp_path_factory.mktemp("defenses"), "synthetic")


@pytest.fixture(scope="module")
def defended(attack_run: Path) -> Defended:
    """Each defense runs once on the attack run (the runner writes into its folder); every
    call also checks that the run's weights on disk are untouched."""
    weights = attack_run / "checkpoints" / "last.safetensors"
    original = _sha(weights)
    results: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in results:
            results[name] = defend(attack_run, name, CASES.get(name, {}))
            assert _sha(weights) == original
        return results[name]

    return get


@pytest.fixture(scope="module")
def neural_cleanse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Neural Cleanse on a backdoored and on a clean digits model."""
    out = tmp_path_factory.mktemp("digits")
    backdoored = _train(DIGITS, out, "backdoored")
    clean = _train(DIGITS, out, "clean", attack={"name": "none"})
    return {"backdoored": defend(backdoored, "neural_cleanse", NEURAL_CLEANSE),
            "clean": defend(clean, "neural_cleanse", {**NEURAL_CLEANSE, "repair": False}),
            "folder": backdoored / "defenses"
            / defense_key(Component("neural_cleanse", NEURAL_CLEANSE))}


def _data(target: DefenseTarget) -> DefenseData:
    """What the runner hands a defense (clean budget 5%, the training set)."""
    return DefenseData(clean=clean_budget(target, 0.05), num_classes=target.num_classes,
                       input_shape=target.input_shape, device=target.device,
                       generator=torch.Generator().manual_seed(0), train=target.train)


# -- contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_reports_its_stage_figures(name, attack_run, defended):
    result = defended(name)
    defense = DEFENSES.build(name, CASES.get(name, {}), "defense")
    assert result["defense"] == name and result["stage"] == defense.stage
    assert result["seconds"] >= 0
    assert (result["clean_samples"] > 0) == defense.uses_clean_data  # data-free: none drawn
    assert result["before"]["clean_accuracy"] > 0.9 and result["before"]["asr"] > 0.9
    if isinstance(defense, (InputDetector, DatasetSanitizer)):
        assert 0.0 <= result["auroc"] <= 1.0 and 0.0 <= result["tpr_at_5_fpr"] <= 1.0
    if isinstance(defense, DatasetSanitizer):
        assert 0.0 <= result["recall_at_1_5x"] <= 1.0
        assert 0 <= result["removed"] <= len(reopen(RunFolder(attack_run)).clean_train)
        assert 0.0 <= result["removed_recall"] <= 1.0
    if isinstance(defense, TrainingDefense):
        assert result["isolated"] > 0 and 0.0 <= result["isolated_precision"] <= 1.0
        assert set(result["after"]) >= {"clean_accuracy", "asr", "robust_accuracy"}
    if isinstance(defense, ModelInspector):
        assert len(result["anomaly_index"]) == 4 and isinstance(result["flagged_classes"], list)
    if isinstance(defense, ModelRepair) or "der" in result:
        assert set(result["after"]) >= {"clean_accuracy", "asr", "robust_accuracy"}
        assert 0.0 <= result["der"] <= 1.0
    summary = json.loads((attack_run / "summary.json").read_text())
    key = defense_key(Component(name, CASES.get(name, {})))
    assert summary["defenses"][key]["defense"] == name
    assert (attack_run / "defenses" / key / "result.json").is_file()


@pytest.mark.parametrize("name", [n for n in DEFENSES.names()
                                  if issubclass(DEFENSES.get(n), (ModelRepair, ModelInspector))])
def test_model_defenses_leave_the_given_model_unchanged(name, attack_run):
    artifact = reopen(RunFolder(attack_run))
    state = {k: v.clone() for k, v in artifact.model.state_dict().items()}
    flags = [p.requires_grad for p in artifact.model.parameters()]
    quick = {k: v for k, v in {"steps": 3, "epochs": 1, "teacher_epochs": 1, "iterations": 3,
                                "rounds": 1}.items()
             if k in DEFENSES.parameters(name)}  # keep the check cheap
    defense = DEFENSES.build(name, quick, "defense")
    data = _data(artifact)
    if isinstance(defense, ModelInspector):
        found = defense.inspect(artifact.model, data)
        defense.unlearn(artifact.model, data, found)
    if isinstance(defense, ModelRepair):
        repaired = defense.repair(artifact.model, data).model
        assert repaired is not artifact.model
    after = artifact.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [p.requires_grad for p in artifact.model.parameters()] == flags


def test_defense_options_are_checked_by_name():
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        defend("unused", "neural_cleanse", {"stpes": 10})


# -- behaviour -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["spectral_signatures", "activation_clustering"])
def test_dataset_sanitizers_rank_poisoned_samples_first(name, defended):
    assert defended(name)["auroc"] > 0.9


def test_strip_separates_triggered_inputs(defended):
    assert defended("strip")["auroc"] > 0.75


def test_input_detectors_score_only_the_first_test_inputs_when_limited(attack_run):
    full = defend(attack_run, "strip", {"n": 4})
    limited = defend(attack_run, "strip", {"n": 4, "test_inputs": 40})
    key = defense_key(Component("strip", {"n": 4, "test_inputs": 40}))
    positive = load_file(str(attack_run / "defenses" / key / "scores.safetensors"))["positive"]
    assert int((~positive.bool()).sum()) == 40 and int(positive.bool().sum()) == 40
    assert limited["auroc"] > 0.7 and full["auroc"] > 0.7
    with pytest.raises(ConfigError, match="test_inputs"):
        defend(attack_run, "strip", {"test_inputs": 0})


def test_fine_pruning_removes_most_of_the_backdoor(defended):
    result = defended("fine_pruning")
    assert result["after"]["asr"] < 0.5
    assert result["after"]["clean_accuracy"] > result["before"]["clean_accuracy"] - 0.05
    assert 0.0 < result["pruned_ratio"] <= 0.9


def test_fine_tuning_keeps_clean_accuracy(defended):
    # The pattern's neurons are dormant on clean data, so fine-tuning barely touches them
    # (the observation behind Fine-Pruning): ASR stays; clean accuracy must too.
    result = defended("fine_tuning")
    assert result["after"]["clean_accuracy"] > result["before"]["clean_accuracy"] - 0.05
    assert result["after"]["asr"] <= result["before"]["asr"] + 1e-9


def test_neural_cleanse_flags_the_target_and_unlearns_it(neural_cleanse):
    result = neural_cleanse["backdoored"]
    assert result["flagged_classes"] == [TARGET]
    assert result["target_anomaly_index"] > 3
    assert result["mask_norms"][TARGET] == min(result["mask_norms"])
    assert result["before"]["asr"] > 0.9 and result["after"]["asr"] < 0.2
    # 20% of 67 images carry the reversed trigger: a few points of clean accuracy go.
    assert result["after"]["clean_accuracy"] > result["before"]["clean_accuracy"] - 0.1
    assert (neural_cleanse["folder"] / "reversed_triggers.png").is_file()


def test_neural_cleanse_suspects_a_clean_model_less(neural_cleanse):
    # On the clean model no small trigger stands out as much as the planted one does. On 8x8
    # digits with 67 clean images the cheapest natural class (often 9) can still pass index
    # 2 for some seeds (a known Neural Cleanse false positive), so the check is relative.
    clean, backdoored = neural_cleanse["clean"], neural_cleanse["backdoored"]
    norms, index = torch.tensor(clean["mask_norms"]), torch.tensor(clean["anomaly_index"])
    suspicion = float(index[norms < norms.median()].max())
    assert TARGET not in clean["flagged_classes"]
    assert suspicion < backdoored["target_anomaly_index"] - 1
    assert "after" not in clean


# -- units ---------------------------------------------------------------------------------


class _Classifier(nn.Module):
    """A stand-in model: `features` returns the flattened pixels, and the logits say
    class 0 with certainty when the top-left pixel is white, else nothing (uniform)."""

    def features(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.zeros(len(x), 3, device=x.device)
        logits[:, 0] = 50.0 * (x[:, 0, 0, 0] > 0.99)
        return logits


def _toy_data(images: Tensor, labels: Tensor, seed: int = 0) -> DefenseData:
    ds = ArrayDataset(images, labels)
    return DefenseData(clean=ds, num_classes=3, input_shape=tuple(images.shape[1:]),
                       device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                       train=ds, batch_size=7)


def test_strip_scores_follow_prediction_entropy_and_repeat_with_the_seed():
    clean = torch.randint(0, 100, (20, 1, 4, 4), dtype=torch.uint8)  # never white
    x = torch.rand(6, 1, 4, 4) * 0.3
    x[:3, 0, 0, 0] = 1.0  # triggered: the overlay cannot hide a saturated pixel
    scores = []
    for _ in range(2):
        strip = Strip(n=5)
        strip.fit(_Classifier(), _toy_data(clean, torch.zeros(20, dtype=torch.long)))
        scores.append(strip.score(_Classifier(), x))
    assert torch.equal(scores[0], scores[1])
    assert torch.allclose(scores[0][:3], torch.zeros(3), atol=1e-6)
    assert torch.allclose(scores[0][3:], torch.full((3,), -math.log(3)), atol=1e-5)


def test_spectral_signatures_score_planted_outliers_highest():
    g = torch.Generator().manual_seed(0)
    images = (100 + 10 * torch.randn(60, 1, 4, 4, generator=g)).to(torch.uint8)
    labels = torch.arange(60) % 2
    poisoned = torch.tensor([1, 5, 9, 13, 17])  # class 1: a shared bright pixel
    images[poisoned, 0, 3, 3] = 250
    data = _toy_data(images, labels)
    data.clean = data.clean.subset(torch.arange(20, 60))  # the budget holds no poison
    scores = SpectralSignatures().sanitize(_Classifier(), data).scores
    assert set(scores.topk(5).indices.tolist()) == set(poisoned.tolist())
    paper = SpectralSignatures(center="class").sanitize(_Classifier(), _toy_data(images, labels))
    paper = paper.scores
    assert set(paper.topk(5).indices.tolist()) == set(poisoned.tolist())


def test_spectral_scores_are_squared_projections_per_class():
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0], [0.0, 9.0]])
    scores = spectral_scores(features, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(scores, torch.tensor([1.0, 1.0, 4.0, 4.0]))


def test_channel_mask_zeroes_exactly_the_pruned_channels():
    x = torch.rand(2, 5, 3, 3) + 0.1
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    out = ChannelMask(mask)(x)
    assert torch.equal(out[:, [0, 2, 4]], x[:, [0, 2, 4]])
    assert not out[:, [1, 3]].any()


def test_pruning_masks_the_feature_map_of_a_real_model(tiny):
    from backdoors.assembly.build import build

    model = build(from_dict(tiny)).model.eval()
    channels = model.feature_map(torch.rand(1, 1, 16, 16)).shape[1]
    mask = torch.ones(channels)
    mask[[0, 3]] = 0.0
    fmap = prune(copy.deepcopy(model), mask).feature_map(torch.rand(4, 1, 16, 16))
    assert not fmap[:, [0, 3]].any() and fmap[:, 1:3].any()


def test_fine_pruning_stops_at_the_ratio_cap(tiny):
    from backdoors.assembly.build import build

    model = build(from_dict(tiny)).model.eval()
    images = torch.randint(0, 256, (30, 1, 16, 16), dtype=torch.uint8)
    data = _toy_data(images, torch.zeros(30, dtype=torch.long))
    mask = FinePruning(max_accuracy_drop=1.0, max_ratio=0.5).choose_mask(model, data)
    assert int((mask == 0).sum()) == mask.numel() // 2


def test_neural_cleanse_flags_only_small_outliers():
    norms = torch.tensor([1.0, 10.0, 10.5, 9.5, 10.2, 30.0])
    assert flag_small(norms, anomaly_index(norms)) == [0]
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])
    assert torch.equal(stamp(torch.zeros(1, 1, 2, 2), mask, torch.ones(1, 2, 2)), mask[None])
