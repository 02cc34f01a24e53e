"""Defense catalogue 2 (FT-SAM, SAU, NPD, BTI-DBF): behaviour on a small finished attack
run, the maths of each on hand-sized inputs, the polarized model's state dict, config
errors."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_defenses_repair import ATTACK
from torch import nn

from backdoors.assembly.artifact import reopen
from backdoors.config import from_dict
from backdoors.defenses import DEFENSES, DefenseData, DefenseTarget
from backdoors.defenses.bti_dbf import decoupling_loss, inversion_loss, with_inverted
from backdoors.defenses.ft_sam import (
    frozen_running_stats,
    sam_gradients,
    sam_perturbation,
    smooth_cross_entropy,
)
from backdoors.defenses.npd import (
    Polarized,
    Polarizer,
    insert_polarizer,
    polarizer_loss,
    project_l2,
    targeted_labels,
)
from backdoors.defenses.runner import clean_budget
from backdoors.defenses.sau import (
    js_divergence,
    log_not_class,
    shared_adversarial_loss,
    shared_examples,
    shared_pgd,
)
from backdoors.defenses.unet import Generator
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.models import MODELS
from backdoors.runs import RunFolder
from backdoors.runs.weights import load_into, load_weights, save_weights, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

# The attack: tests/test_defenses_repair.py's (the synthetic task, 10% data poisoning,
# pattern trigger, target 1).
# Small settings for speed. The synthetic clean budget is 17 images, one batch: FT-SAM
# takes a larger learning rate (0.05; at the default 0.01, 20 epochs leave the backdoor)
# and SAU a larger Adam step for the few steps it gets.
SETTINGS: dict[str, dict[str, Any]] = {
    "ft_sam": {"epochs": 20, "batch_size": 64, "lr": 0.05},
    "sau": {"epochs": 10, "batch_size": 64, "lr": 1e-3},
    "npd": {"epochs": 10, "batch_size": 64},
}
# BTI-DBF meets the pattern trigger on the 10 digits (on the 4 blob classes its generator
# finds a blob class, not the trigger): 10% clean budget, 2 rounds of small epochs, a
# small U-Net with a larger learning rate, and half of each unlearning batch inverted
# (the default 10% of a 2-batch budget leaves most of the backdoor).
DIGITS: dict[str, Any] = {
    **ATTACK, "name": "digits", "task": {"name": "digits"},
    "train": {**ATTACK["train"], "batch_size": 32},
}
BTI_DBF: dict[str, Any] = {
    "rounds": 2, "mask_epochs": 20, "generator_epochs": 40, "unlearn_epochs": 20,
    "generator_width": 8, "generator_levels": 2, "generator_lr": 0.01, "unlearn_lr": 1e-3,
    "poison_fraction": 0.5,
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> DefenseTarget:
    out = tmp_path_factory.mktemp("g2")
    run(from_dict(copy.deepcopy(ATTACK)), out=out, name="synthetic", quiet=True)
    return reopen(RunFolder(out / "synthetic"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DefenseTarget:
    out = tmp_path_factory.mktemp("g2digits")
    run(from_dict(copy.deepcopy(DIGITS)), out=out, name="digits", quiet=True)
    return reopen(RunFolder(out / "digits"))


def _data(artifact: DefenseTarget, fraction: float = 0.05) -> DefenseData:
    return DefenseData(clean=clean_budget(artifact, fraction),
                       num_classes=artifact.num_classes,
                       input_shape=artifact.input_shape, device=artifact.device,
                       generator=torch.Generator().manual_seed(0))


# -- behaviour -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_repair_removes_the_backdoor_and_keeps_accuracy(name, artifact):
    before = artifact.evaluate(artifact.model)
    state = {k: v.clone() for k, v in artifact.model.state_dict().items()}
    repaired = DEFENSES.build(name, SETTINGS[name], "defense").repair(
        artifact.model, _data(artifact))
    after = artifact.evaluate(repaired.model)
    assert before["asr"] > 0.95 and before["clean_accuracy"] > 0.95
    assert after["asr"] < 0.3, after
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.05
    assert repaired.model is not artifact.model
    assert all(torch.equal(v, artifact.model.state_dict()[k]) for k, v in state.items())


def test_bti_dbf_inverts_the_target_and_unlearns_it(digits):
    before = digits.evaluate(digits.model)
    repaired = DEFENSES.build("bti_dbf", BTI_DBF, "defense").repair(
        digits.model, _data(digits, 0.1))
    after = digits.evaluate(repaired.model)
    assert before["asr"] > 0.95 and before["clean_accuracy"] > 0.95
    assert repaired.figures["detected_target"] == 1  # found without scanning classes
    assert repaired.figures["inverted_success_before"] > 0.8
    assert after["asr"] < 0.6, after  # measured 0.24
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.08  # measured -0.04
    assert repaired.artifacts["inverted_poisoned"].shape[0] == 8


# -- FT-SAM --------------------------------------------------------------------------------


def _quadratic() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L(w) = 1/2 sum(a * w^2) on two weight tensors, float64: the gradient is a * w."""
    w = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True),
         torch.tensor([[3.0, 0.1]], dtype=torch.float64, requires_grad=True)]
    a = [torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64),
         torch.tensor([[0.5, 3.0]], dtype=torch.float64)]
    return w, a, [ai * wi.detach() for ai, wi in zip(a, w, strict=True)]


def test_sam_perturbation_is_rho_along_the_gradient():
    w, _, g = _quadratic()
    eps = sam_perturbation(w, g, rho=0.3, adaptive=False)
    flat_e, flat_g = torch.cat([e.flatten() for e in eps]), torch.cat([x.flatten() for x in g])
    assert math.isclose(float(flat_e.norm()), 0.3, rel_tol=1e-9)
    assert torch.allclose(flat_e, 0.3 * flat_g / flat_g.norm())


def test_adaptive_sam_maximises_the_linear_loss_on_its_ellipsoid():
    # ASAM's ε solves max g·ε subject to ||ε / T|| <= rho with T = |w| + eta: it lies on
    # the ellipsoid and no other point of it rises faster; large weights move most.
    w, _, g = _quadratic()
    rho, eta = 0.5, 0.01
    eps = sam_perturbation(w, g, rho=rho, adaptive=True, eta=eta)
    t = torch.cat([wi.detach().abs().flatten() + eta for wi in w])
    e, grad = torch.cat([x.flatten() for x in eps]), torch.cat([x.flatten() for x in g])
    assert math.isclose(float((e / t).norm()), rho, rel_tol=1e-9)
    rival = torch.randn(1000, len(t), generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    rival = rho * t * rival / rival.norm(dim=1, keepdim=True)  # on the same ellipsoid
    assert float(grad @ e) >= float((rival @ grad).max())
    assert torch.allclose(e, rho * t**2 * grad / (t * grad).norm())


def test_sam_gradient_is_taken_at_the_perturbed_weights_and_weights_come_back():
    w, a, g = _quadratic()
    start = [wi.detach().clone() for wi in w]

    def loss_fn(perturbed: bool) -> torch.Tensor:
        return sum(0.5 * (ai * wi**2).sum() for ai, wi in zip(a, w, strict=True))

    loss, grads = sam_gradients(w, loss_fn, rho=0.2, adaptive=True)
    eps = sam_perturbation(start, g, rho=0.2, adaptive=True)
    assert math.isclose(float(loss), float(loss_fn(False).detach()))
    for wi, si, ai, ei, gi in zip(w, start, a, eps, grads, strict=True):
        assert torch.equal(wi.detach(), si)
        assert torch.allclose(gi, ai * (si + ei))  # ∇L(w + ε) of the quadratic


def test_smoothed_cross_entropy_spreads_the_smoothing_over_other_classes():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    assert torch.allclose(smooth_cross_entropy(logits, labels, 0.0),
                          F.cross_entropy(logits, labels))
    log_p = logits.log_softmax(1)
    by_hand = -(0.8 * log_p[0, 0] + 0.1 * (log_p[0, 1] + log_p[0, 2])
                + 0.8 * log_p[1, 2] + 0.1 * (log_p[1, 0] + log_p[1, 1])) / 2
    assert torch.allclose(smooth_cross_entropy(logits, labels, 0.2), by_hand)


def test_batch_norm_statistics_stay_frozen_in_the_perturbed_pass():
    bn = nn.BatchNorm2d(3).train()
    with frozen_running_stats(bn):
        bn(torch.randn(4, 3, 2, 2) + 5)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and bn.momentum == 0.1
    bn(torch.randn(4, 3, 2, 2) + 5)
    assert bool((bn.running_mean > 0.1).all())


# -- SAU -----------------------------------------------------------------------------------


def test_js_divergence_is_symmetric_zero_on_equal_and_log2_on_disjoint():
    p = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    q = torch.tensor([[0.0, 1.0], [0.3, 0.7]])
    js = js_divergence(p, q)
    assert math.isclose(float(js[0]), math.log(2), rel_tol=1e-5)
    assert abs(float(js[1])) < 1e-7
    assert torch.allclose(js, js_divergence(q, p))


def test_shared_examples_need_both_models_fooled_into_one_class():
    clean, ref_clean = torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1])
    pred, ref_pred = torch.tensor([2, 2, 0, 2]), torch.tensor([2, 3, 2, 1])
    assert shared_examples(pred, ref_pred, clean, ref_clean).tolist() == [True, False, False,
                                                                          False]


def test_log_not_class_is_stable_and_exact():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 60.0, 0.0]])
    classes = torch.tensor([0, 1])
    naive = torch.log1p(-logits.softmax(1).gather(1, classes[:, None]).squeeze(1))
    stable = log_not_class(logits, classes)
    assert torch.allclose(stable[0], naive[0])
    assert math.isfinite(float(stable[1])) and math.isclose(  # p rounds to 1 in float32
        float(stable[1]), math.log(2) - 60, rel_tol=1e-5)


def test_shared_adversarial_loss_counts_only_potential_poison():
    adv_logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 5.0],
                               [9.0, -9.0, -9.0]])
    labels = torch.tensor([0, 0, 2, 1])
    ref_adv = torch.tensor([1, 1, 2, 0])  # row 2: not fooled; row 3: p(0) > 0.999 counts
    ref_clean = torch.tensor([0, 1, 2, 1])  # row 1: the reference's clean prediction
    p = adv_logits.softmax(1)
    expected = -(torch.log1p(-p[0, 1]) + log_not_class(adv_logits[3:], ref_adv[3:])[0]) / 4
    got = shared_adversarial_loss(adv_logits, ref_adv, ref_clean, labels)
    assert torch.allclose(got, expected)


class _Linear(nn.Module):
    """A fixed linear classifier of 2-pixel inputs."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.weight = torch.tensor(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_shared_pgd_stays_in_the_box_and_fools_both_models_together():
    model = _Linear([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    x = torch.tensor([[[[0.3, 0.1]]], [[[0.1, 0.35]]]])
    y = torch.tensor([0, 1])
    delta, shared = shared_pgd(model, model, x, y, bound=0.5, step=0.5, steps=5,
                               beta_1=0.01, beta_2=1.0)
    assert float(delta.abs().max()) <= 0.5 + 1e-7
    assert bool(shared.all())  # one model twice: every adversarial example is shared


# -- NPD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (6, 5)])
def test_polarizer_starts_as_the_identity_and_mixes_channels_per_position(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 2
    polarizer = Polarizer(shape[1])
    assert torch.allclose(polarizer(x), x, atol=1e-6)
    with torch.no_grad():
        polarizer.conv.weight[0, 1] = 2.0  # channel 0 += 2 x channel 1, everywhere
        polarizer.conv.bias[0] = 1.0
    expected = x.clone()
    expected[:, 0] += 2 * x[:, 1] + 1
    assert torch.allclose(polarizer(x), expected, atol=1e-5)


def test_projection_targets_and_loss_of_npd():
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    assert torch.allclose(project_l2(delta, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    logits = torch.tensor([[5.0, 4.0, 1.0], [0.0, 1.0, 3.0]])
    assert targeted_labels(logits, torch.tensor([0, 2])).tolist() == [1, 1]
    labels, clean_pred, targets = torch.tensor([0, 2]), torch.tensor([0, 2]), torch.tensor([1, 1])
    clean_only = polarizer_loss(logits, logits, labels, clean_pred, targets, (1, 0, 0, 0))
    assert torch.allclose(clean_only, F.cross_entropy(logits, labels))
    p = logits.softmax(1)
    wrong = -(torch.log(1.0001 - p[0, 1]) + torch.log(1.0001 - p[1, 1])) / 2  # top wrong
    assert torch.allclose(polarizer_loss(logits, logits, labels, clean_pred, targets,
                                         (0, 0, 1, 0)), wrong)
    assert torch.allclose(polarizer_loss(logits, logits, labels, clean_pred, targets,
                                         (0, 0, 0, 1)), wrong)  # targets = top wrong here


def _simple_net() -> nn.Module:
    return MODELS.build("simple_net", {}, "model", num_classes=3, input_shape=(1, 12, 12),
                        mean=[0.5], std=[0.5]).eval()


def test_polarized_model_keeps_its_stages_and_its_state_dict_round_trips(tmp_path):
    model = _simple_net()
    polarizer = insert_polarizer(model, "pool.1", 450)
    with torch.no_grad():
        polarizer.conv.weight.mul_(0.5)
        polarizer.conv.bias.add_(0.1)
    assert isinstance(model.pool[1], Polarized) and isinstance(model.head, nn.Linear)
    x = torch.rand(3, 1, 12, 12)
    assert model.features(x).shape == (3, 500) and model.feature_map(x).dim() == 4
    save_weights(tmp_path / "model.safetensors", state_of(model))
    fresh = _simple_net()
    insert_polarizer(fresh, "pool.1", 450)
    load_into(fresh.eval(), load_weights(tmp_path / "model.safetensors"), "model")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_npd_repairs_leave_a_polarizer_in_the_model(artifact):
    result = DEFENSES.build("npd", {"epochs": 1}, "defense").repair(
        artifact.model, _data(artifact))
    name = result.figures["polarizer_layer"]
    assert name == "pool.1"  # tiny_cnn's hidden Linear: its last layer before the head
    assert isinstance(result.model.get_submodule(name), Polarized)
    assert all(p.requires_grad for p in result.model.parameters())
    assert result.artifacts["polarizer_matrix"].shape[-2:] == (
        result.figures["polarizer_channels"],) * 2


def test_npd_restores_the_polarized_model_from_its_saved_weights(artifact, tmp_path):
    npd = DEFENSES.build("npd", {"epochs": 1}, "defense")
    repaired = npd.repair(artifact.model, _data(artifact)).model
    save_weights(tmp_path / "model.safetensors", state_of(repaired))
    rebuilt = npd.restore(copy.deepcopy(artifact.model),
                          load_weights(tmp_path / "model.safetensors")).eval()
    x = torch.rand(5, *artifact.input_shape)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), repaired(x))
    assert not torch.equal(rebuilt.state_dict()["pool.1.polarizer.conv.weight"],
                           Polarizer(rebuilt.pool[1].polarizer.conv.in_channels).conv.weight)


# -- BTI-DBF -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (2, 1, 16, 16)])
def test_generator_starts_as_the_identity_at_any_size(shape):
    x = torch.rand(shape)
    generator = Generator(shape[1], width=4, levels=4).eval()
    with torch.no_grad():
        assert torch.equal(generator(x), x)


class _Pooled(nn.Module):
    """A model whose pool flattens and whose head is a fixed linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.Flatten()
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_decoupling_loss_rewards_masks_that_keep_the_label_feature():
    model, labels = _Pooled(), torch.tensor([0, 1])
    fmap = torch.tensor([[[[4.0]], [[0.0]]], [[[0.0]], [[4.0]]]])  # feature i says class i
    keep, drop = torch.ones(2, 1, 1), torch.zeros(2, 1, 1)
    good = decoupling_loss(model, fmap, keep, labels)
    bad = decoupling_loss(model, fmap, drop, labels)
    ce = F.cross_entropy(torch.tensor([[4.0, 0.0], [0.0, 4.0]]), labels)
    flat = F.cross_entropy(torch.zeros(2, 2), labels)
    assert torch.allclose(good, ce - flat) and torch.allclose(bad, flat - ce)


def test_inversion_loss_pulls_back_outside_the_bounds():
    clean, mask = torch.zeros(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(2, 1, 1)
    gen = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    loss, inside = inversion_loss(clean, gen, mask, torch.tensor(0.1), 0.3, 3.0)
    assert inside and torch.allclose(loss, torch.tensor(-4.0 / 2 + 0.01 * 0.25 / 2))
    loss, inside = inversion_loss(clean, gen, mask, torch.tensor(0.5), 0.3, 3.0)
    assert not inside and float(loss) == 0.5
    loss, inside = inversion_loss(clean, gen, mask, torch.tensor(0.1), 0.3, 0.1)
    assert not inside  # benign features moved too far


def test_unlearning_batches_replace_a_tenth_plus_one_row():
    x = torch.zeros(20, 1, 4, 4)
    mixed = with_inverted(x, lambda t: t + 1, 0.1, torch.Generator().manual_seed(0))
    assert int((mixed.flatten(1).sum(1) > 0).sum()) == 3 and not x.any()


# -- config errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("ft_sam", {"rho": -1}, "rho and eta must be >= 0"),
    ("ft_sam", {"label_smoothing": 1.0}, "label_smoothing"),
    ("sau", {"norm_bound": 0}, "norm_bound and adv_lr must be > 0"),
    ("sau", {"lmd_3": -1}, "must be >= 0"),
    ("npd", {"lmd2": -0.1}, "must be >= 0"),
    ("npd", {"trigger_nrom": 3}, "did you mean 'trigger_norm'"),
    ("bti_dbf", {"poison_fraction": 2}, "poison_fraction"),
    ("bti_dbf", {"generator_levels": 0}, "generator_levels"),
])
def test_bad_options_name_the_key(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DEFENSES.build(name, kwargs, f"defense '{name}'")


def test_npd_unknown_layer_names_it(artifact):
    with pytest.raises(ConfigError, match=r"layer names 'pool.9'.*did you mean"):
        DEFENSES.build("npd", {"layer": "pool.9"}, "d").repair(artifact.model, _data(artifact))
