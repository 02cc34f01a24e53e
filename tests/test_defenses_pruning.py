"""Pruning repairs of defense catalogue 2: CLP, BNP, EP and RNP. Behaviour on small
finished attack runs, the maths on hand-sized inputs, layer discovery, config errors."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from backdoors.data.dataset import ArrayDataset
from backdoors.defenses import DEFENSES, DefenseData
from backdoors.defenses.bnp import BNP, channel_sums, gaussian_kl, moments
from backdoors.defenses.channels import (
    batch_norms,
    channel_layers,
    conv_norm_pairs,
    outliers,
    prune_outliers,
    reduce_pre_activations,
)
from backdoors.defenses.clp import CLP, channel_lipschitz, norm_scale, zero_channels
from backdoors.defenses.ep import EP, histogram_entropy, spatial_max, standardise_rows
from backdoors.defenses.rnp import RNP, prune_filters
from backdoors.errors import ConfigError
from backdoors.models import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Random weights and images below are drawn from a fixed seed: deterministic tests."""
    torch.manual_seed(0)


def _model(name: str, shape: tuple[int, int, int] = (1, 12, 12), **kwargs: Any) -> nn.Module:
    return MODELS.build(name, kwargs, "model", num_classes=3, input_shape=shape,
                        mean=[0.5] * shape[0], std=[0.5] * shape[0]).eval()


def _data(images: torch.Tensor, labels: torch.Tensor | None = None) -> DefenseData:
    labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    ds = ArrayDataset(images, labels)
    return DefenseData(clean=ds, num_classes=3, input_shape=tuple(images.shape[1:]),
                       device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                       train=ds, batch_size=5)


# -- shared: outliers, BN discovery, conv -> BN pairs --------------------------------------


def test_outliers_use_mean_and_unbiased_std_of_the_layer():
    # Nine 1s and a 10: mean 1.9, unbiased std sqrt(8.1) = 2.846; the 10 sits 2.85 std
    # above the mean, the most one value in ten can.
    values = torch.tensor([1.0] * 9 + [10.0])
    assert outliers(values, 2.0).tolist() == [False] * 9 + [True]
    assert not outliers(values, 3.0).any()
    assert outliers(-values, 2.0, "lower").tolist() == [False] * 9 + [True]
    assert not outliers(torch.tensor([5.0]), 0.0).any()  # one channel: no spread


def test_conv_norm_pairs_follow_the_data_not_the_module_order():
    tiny = _model("tiny_cnn")
    assert [(n, bn is not None) for n, _, bn in conv_norm_pairs(tiny, (1, 12, 12))] == [
        ("body.0", True), ("body.3", True), ("body.7", True)]
    assert all(bn is None for _, _, bn in conv_norm_pairs(_model("simple_net"), (1, 12, 12)))
    # Pre-activation blocks: the stem's output is what layer1.0.bn1 normalises, but
    # conv2's output is added to the shortcut before the next BN sees it.
    preact = _model("preact_resnet18", (3, 8, 8), width=2)
    pairs = {n: bn for n, _, bn in conv_norm_pairs(preact, (3, 8, 8))}
    assert pairs["body.stem"] is preact.body.layer1[0].bn1
    assert pairs["body.layer1.0.conv1"] is preact.body.layer1[0].bn2
    assert pairs["body.layer1.0.conv2"] is None
    resnet = _model("resnet18", (3, 8, 8), width=2)
    assert all(bn is not None for _, _, bn in conv_norm_pairs(resnet, (3, 8, 8)))


def test_bnp_refuses_a_model_without_batch_norm_by_name():
    with pytest.raises(ConfigError, match="model 'simple_net' has none"):
        batch_norms(_model("simple_net"), "bnp")
    data = _data(torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8))
    with pytest.raises(ConfigError, match="simple_net"):
        BNP().repair(_model("simple_net"), data)


def test_ep_scores_conv_outputs_of_a_model_without_batch_norm():
    model = _model("simple_net")
    data = _data(torch.randint(0, 256, (30, 1, 12, 12), dtype=torch.uint8))
    layers = channel_layers(model)
    assert [n for n, _ in layers] == ["body.0", "body.3"]
    # A conv's pre-activation is its own output: the maxima EP reads match a direct run.
    maxima = reduce_pre_activations(model, [model.body[0]], data.train, data, spatial_max,
                                    "maxima")
    x = torch.cat([b.inputs for b in data.loader(data.train)])
    with torch.no_grad():
        direct = spatial_max(model.body[0](model.normalize(x)))
    assert torch.allclose(torch.cat(maxima[0]), direct)
    result = EP(u=0.5).repair(model, data)
    assert result.figures["pruned_channels"] > 0
    assert result.artifacts["scores"].shape == (20 + 50,)


def test_pruning_a_norm_zeroes_only_its_scale_and_skips_unscored_channels():
    norm = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.bias.fill_(0.5)
    scores = torch.tensor([0.0, 0.0, float("nan"), 9.0])
    figures, drawn = prune_outliers([("bn", norm)], [scores], 0.5, "upper")
    assert norm.weight.tolist() == [1.0, 2.0, 3.0, 0.0] and norm.bias.tolist() == [0.5] * 4
    assert figures["pruned_channels"] == 1 and figures["pruned_per_layer"] == {"bn": 1}
    assert math.isnan(drawn[2]) and drawn[3] > 0


# -- CLP -----------------------------------------------------------------------------------


def test_channel_lipschitz_is_the_spectral_norm_of_each_kernel():
    weight = torch.zeros(2, 2, 2, 2)
    # Channel 0: rows [3, 0, 0, 0] and [0, 4, 0, 0] -> singular values 4 and 3.
    weight[0, 0, 0, 0], weight[0, 1, 0, 1] = 3.0, 4.0
    # Channel 1: a 2 x 4 matrix of ones, rank one -> sqrt(2 * 4).
    weight[1] = 1.0
    bound = channel_lipschitz(weight)
    assert torch.allclose(bound, torch.tensor([4.0, math.sqrt(8.0)], dtype=torch.float64))
    scaled = channel_lipschitz(weight, torch.tensor([0.5, -2.0]))
    assert torch.allclose(scaled, torch.tensor([2.0, 2 * math.sqrt(8.0)], dtype=torch.float64))


def test_norm_scale_folds_an_eval_batch_norm():
    norm = nn.BatchNorm2d(2, eps=0.0).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([3.0, -1.0]))
        norm.running_var.copy_(torch.tensor([4.0, 0.25]))
    assert torch.allclose(norm_scale(norm), torch.tensor([1.5, -2.0]))


def test_zeroed_channels_output_zero_through_conv_and_norm():
    conv, norm = nn.Conv2d(1, 3, 3, bias=True), nn.BatchNorm2d(3)
    norm.running_mean.fill_(0.3)
    model = nn.Sequential(conv, norm).eval()
    zero_channels(conv, norm, torch.tensor([False, True, False]))
    out = model(torch.rand(2, 1, 5, 5))
    assert not out[:, 1].any() and out[:, 0].any() and out[:, 2].any()


def test_clp_prunes_a_planted_high_lipschitz_channel_without_data():
    model = _model("tiny_cnn", width=8)
    with torch.no_grad():
        model.body[3].weight[5] *= 40.0  # one channel far more sensitive than the rest
    empty = _data(torch.zeros(0, 1, 12, 12, dtype=torch.uint8))
    result = CLP().repair(model, empty)
    assert result.figures["pruned_per_layer"] == {"body.3": 1}
    assert not result.model.body[3].weight[5].any()
    assert model.body[3].weight[5].any()  # the model passed in is untouched
    assert result.artifacts["uclc_standardised"].shape == (8 + 16 + 16,)
    assert CLP.uses_clean_data is False


# -- BNP -----------------------------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions():
    m1, v1 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 3.0])
    m2, v2 = torch.tensor([0.5, 1.0, 1.0]), torch.tensor([2.0, 0.5, 1.0])
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()),
                                                 torch.distributions.Normal(m2, v2.sqrt()))
    assert torch.allclose(gaussian_kl(m1, v1, m2, v2), expected, atol=1e-6)
    assert gaussian_kl(m1, v1, m1, v1).abs().max() < 1e-7


def test_moments_summed_over_batches_match_the_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    mean, var = moments(channel_sums(x[:3]) + channel_sums(x[3:]))
    assert torch.allclose(mean.float(), x.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(var.float(), x.transpose(0, 1).flatten(1).var(1), atol=1e-5)


def test_bnp_prunes_the_channel_whose_clean_statistics_disagree_with_bn():
    model = _model("tiny_cnn", width=8)
    images = torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8)
    data = _data(images)
    # Store the clean statistics in every BN, then move one channel's running mean far
    # away: what a poisoned population would do to it.
    sums = reduce_pre_activations(model, [m for _, m in batch_norms(model)], data.clean,
                                  data, channel_sums, "statistics")
    with torch.no_grad():
        for (_, norm), batches in zip(batch_norms(model), sums, strict=True):
            mean, var = moments(torch.stack(batches).sum(0))
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
        norm = model.body[4]
        norm.running_mean[3] += 10 * norm.running_var[3].sqrt()
    result = BNP().repair(model, data)
    assert result.figures["pruned_per_layer"] == {"body.4": 1}
    assert result.model.body[4].weight[3] == 0 and model.body[4].weight[3] != 0


# -- EP ------------------------------------------------------------------------------------


def test_histogram_entropy_by_hand_and_for_a_gaussian():
    values = torch.tensor([[0.0, 0.5, 1.0, 1.5]])
    # Width 1: two bins of two -> log 2 (+ log 1); width 0.5: four bins of one -> log 4 +
    # log 0.5 = log 2 as well (the same uniform density).
    assert torch.allclose(histogram_entropy(values, 1.0), torch.tensor([math.log(2.0)],
                                                                       dtype=torch.float64))
    assert torch.allclose(histogram_entropy(values, 0.5), torch.tensor([math.log(2.0)],
                                                                       dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(1, 20000, generator=g)
    two_modes = torch.cat([torch.randn(1, 18000, generator=g),
                           8 + torch.randn(1, 2000, generator=g)], 1)
    z = standardise_rows(torch.cat([gauss, two_modes]))
    entropy = histogram_entropy(z, 0.05)
    assert abs(float(entropy[0]) - 0.5 * math.log(2 * math.pi * math.e)) < 0.05
    assert entropy[1] < entropy[0] - 0.3  # a mixture is far from the maximum


def test_standardise_rows_marks_constant_channels():
    z = standardise_rows(torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]))
    assert torch.allclose(z[0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert z[1].isnan().all()
    assert spatial_max(torch.arange(8.0).view(1, 2, 2, 2)).tolist() == [[3.0, 7.0]]


def test_ep_reads_the_training_set_and_no_clean_data():
    assert EP.uses_training_set and not EP.uses_clean_data


# -- RNP -----------------------------------------------------------------------------------


def test_rnp_masks_batch_norm_channels_or_else_conv_filters():
    assert [n for n, _ in channel_layers(_model("tiny_cnn"))] == ["body.1", "body.4", "body.8"]
    assert [n for n, _ in channel_layers(_model("simple_net"))] == ["body.0", "body.3"]


def test_prune_filters_zeroes_the_weight_and_keeps_the_shift():
    model = _model("tiny_cnn", width=4)
    pruned = prune_filters(copy.deepcopy(model), ["body.1", "body.4"],
                           [torch.tensor([True, False, False, False]),
                            torch.tensor([False] * 7 + [True])])
    assert pruned.body[1].weight[0] == 0 and pruned.body[4].weight[7] == 0
    assert torch.equal(pruned.body[1].bias, model.body[1].bias)
    assert int((pruned.body[4].weight == 0).sum()) == 1


def test_rnp_prunes_masks_under_the_threshold_or_the_smallest_number():
    masks = [torch.tensor([0.9, 0.1, 0.3]), torch.tensor([0.2, 0.05])]
    by_threshold = RNP(threshold=0.2).pruned(masks)
    assert [f.tolist() for f in by_threshold] == [[False, True, False], [True, True]]
    by_number = RNP(pruning_by="number", pruning_number=2).pruned(masks)
    assert [f.tolist() for f in by_number] == [[False, True, False], [False, True]]
    assert not any(f.any() for f in RNP(pruning_by="number", pruning_number=0).pruned(masks))


def _predicted(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.train()(images.float() / 255).argmax(1)


def test_rnp_unlearning_stops_before_stepping_on_a_batch_under_the_threshold():
    """The stopping rule is checked every batch, before its ascent step: a model already
    wrong on the budget is returned untouched (the fix for an unlearning that ran a whole
    epoch past the threshold)."""
    model, images = _model("simple_net"), torch.randint(0, 256, (20, 1, 12, 12),
                                                        dtype=torch.uint8)
    wrong = (_predicted(model, images) + 1) % 3
    unlearned, history = RNP(batch_size=10).unlearn(model, _data(images, wrong))
    assert history == [0.0]
    assert all(torch.equal(a, b) for a, b in zip(unlearned.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


def test_rnp_unlearning_ascends_until_the_threshold():
    model, images = _model("simple_net"), torch.randint(0, 256, (20, 1, 12, 12),
                                                        dtype=torch.uint8)
    right = _predicted(model, images)
    _, history = RNP(batch_size=10, unlearning_lr=0.5, clean_threshold=0.5,
                     unlearning_epochs=50).unlearn(model, _data(images, right))
    assert history[0] == 1.0 and history[-1] <= 0.5 < min(history[:-1])


# -- config errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("clp", {"u": -1}, "u must be >= 0"),
    ("bnp", {"u": -0.5}, "u must be >= 0"),
    ("ep", {"bin_width": 0}, "bin_width must be > 0"),
    ("rnp", {"threshold": 1.5}, "threshold must be in"),
    ("rnp", {"recovering_lr": 0}, "must be > 0"),
    ("rnp", {"pruning_by": "fraction"}, "pruning_by must be"),
    ("rnp", {"unlearning_epoch": 3}, "did you mean 'unlearning_epochs'"),
])
def test_bad_options_are_config_errors(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DEFENSES.build(name, kwargs, "defense")


# -- behaviour on a finished attack run -----------------------------------------------------

# The synthetic task (4 blob classes, tiny_cnn with batch norm) with 10% data poisoning and
# the pattern trigger, one epoch: more epochs make clean inputs' loss exactly 0 in float32,
# and then RNP's gradient ascent has nothing to climb.
ATTACK: dict[str, Any] = {
    "name": "pruned", "seed": 0, "task": {"name": "synthetic"},
    "train": {"epochs": 1, "lr": 0.05, "tensorboard": False, "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}
# tiny_cnn's layers have 8-16 channels, and in a layer of n channels no score can lie more
# than (n - 1) / sqrt(n) standard deviations above the mean (2.5 for 8, 3.75 for 16): the
# papers' u = 3, set for ResNet-18's 64-512 channels, can hardly fire here.
BEHAVIOUR: dict[str, dict[str, Any]] = {"clp": {"u": 1.0}, "bnp": {"u": 1.5},
                                        "ep": {"u": 1.0}}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from backdoors.assembly.artifact import reopen
    from backdoors.config import from_dict
    from backdoors.experiment import run
    from backdoors.runs import RunFolder

    out = tmp_path_factory.mktemp("g1")
    run(from_dict(copy.deepcopy(ATTACK)), out=out, name="attack", quiet=True)
    return reopen(RunFolder(out / "attack"))


def _budget(artifact: Any) -> DefenseData:
    from backdoors.defenses.runner import clean_budget

    return DefenseData(clean=clean_budget(artifact, 0.05), num_classes=artifact.num_classes,
                       input_shape=artifact.input_shape, device=artifact.device,
                       generator=torch.Generator().manual_seed(0), train=artifact.train)


@pytest.mark.parametrize("name", sorted(BEHAVIOUR))
def test_pruning_lowers_the_asr_and_keeps_accuracy(name, artifact):
    before = artifact.evaluate(artifact.model)
    result = DEFENSES.build(name, BEHAVIOUR[name], "defense").repair(
        artifact.model, _budget(artifact))
    after = artifact.evaluate(result.model)
    assert before["asr"] > 0.7 and before["clean_accuracy"] > 0.95
    assert after["asr"] < 0.6 * before["asr"]  # measured: 0.10 (clp), 0.5 (bnp), 0.0 (ep)
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.05
    assert result.figures["pruned_channels"] > 0
    assert result.artifacts["scores"].dim() == 1


@pytest.mark.parametrize("name", ["clp", "bnp", "ep", "rnp"])
def test_a_saved_pruned_model_is_restored(name, artifact):
    """The runner saves the pruned model's weights; `restore` on a copy of the attacked
    model gives the same model back (pruning only zeroes weights: no new layers)."""
    options = {**BEHAVIOUR.get(name, {}), **({"unlearning_epochs": 2, "recovering_epochs": 2}
                                             if name == "rnp" else {})}
    defense = DEFENSES.build(name, options, "defense")
    repaired = defense.repair(artifact.model, _budget(artifact)).model
    state = {k: v.clone() for k, v in repaired.state_dict().items()}
    restored = defense.restore(copy.deepcopy(artifact.model), state).eval()
    x = torch.rand(4, *artifact.input_shape)
    assert torch.equal(restored(x), repaired.eval()(x))


# RNP needs a model whose unlearned copy falls onto the backdoor, and enough clean batches
# for its stopping rule: on tiny_cnn the unlearned model sends everything to some other
# class and the masks single nothing out (docs/defenses_pruning.md, "where it fails").
# A batch-norm ResNet-18 (width 4) on the 10 digits with a quarter of the training set
# as budget (337 images, 6 batches) behaves as the paper describes.
RNP_ATTACK: dict[str, Any] = {
    "name": "rnp", "seed": 0, "task": {"name": "digits"}, "model": {"name": "resnet18", "width": 4},
    "train": {"epochs": 15, "lr": 0.02, "batch_size": 32, "tensorboard": False,
              "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}


def test_rnp_lowers_the_asr_of_a_batch_norm_resnet(tmp_path):
    from backdoors.assembly.artifact import reopen
    from backdoors.config import from_dict
    from backdoors.defenses.runner import clean_budget
    from backdoors.experiment import run
    from backdoors.runs import RunFolder

    run(from_dict(copy.deepcopy(RNP_ATTACK)), out=tmp_path, name="attack", quiet=True)
    artifact = reopen(RunFolder(tmp_path / "attack"))
    data = DefenseData(clean=clean_budget(artifact, 0.25), num_classes=artifact.num_classes,
                       input_shape=artifact.input_shape, device=artifact.device,
                       generator=torch.Generator().manual_seed(0), batch_size=64)
    before = artifact.evaluate(artifact.model)
    result = DEFENSES.build("rnp", {"unlearning_lr": 0.05, "threshold": 0.05},
                            "defense").repair(artifact.model, data)
    after = artifact.evaluate(result.model)
    # measured: clean 94.0% -> 70.7%, ASR 92.8% -> 5.9%, 40 channels pruned
    assert before["asr"] > 0.8 and before["clean_accuracy"] > 0.9
    assert after["asr"] < 0.25
    assert after["clean_accuracy"] > 0.5  # far above the 10% of a model RNP broke
    assert result.figures["clean_budget_accuracy_unlearned"] <= 0.2
    assert 0 < result.figures["pruned_channels"] < 100
