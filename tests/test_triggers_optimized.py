"""Optimised triggers: prepare() is deterministic, respects its bounds and actually
optimises (against its own surrogate); label-consistent poisoning implants a backdoor end
to end where the same budget of random noise does not.

Everything runs on a small synthetic task (1x16x16 blobs, 4 classes) with a few surrogate
epochs and optimisation steps, so the file stays well under a minute and a half.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.batch import Batch
from backdoors.config import from_dict
from backdoors.data import TASKS
from backdoors.data.dataset import ArrayDataset
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.synthesizers import SYNTHESIZERS, Synthesizer
from backdoors.synthesizers.surrogate import TrainingRows, pgd
from backdoors.synthesizers.trojan_nn import most_connected

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = 1
SHAPE = (1, 16, 16)
CLASSES = 4
CPU = {"device": "cpu", "batch_size": 64}
# Settings that optimise enough to test the effect, per trigger.
EFFECTIVE: dict[str, dict[str, Any]] = {
    "label_consistent": {**CPU, "surrogate_epochs": 2, "eps": 64 / 255, "pgd_steps": 5,
                         "robust_steps": 0},
    "narcissus": {**CPU, "surrogate_epochs": 2, "trigger_steps": 40, "step_size": 2 / 255},
    "trojan_nn": {**CPU, "surrogate_epochs": 2, "trigger_steps": 40, "trigger_lr": 0.1,
                  "size": 6},
    # Enough mask steps (10 epochs of 16 batches) that every input gets a non-empty mask;
    # 3 epochs left empty or one-pixel masks, and the surrogate then learnt no trigger.
    "input_aware": {**CPU, "batch_size": 32, "mask_epochs": 10, "surrogate_epochs": 8,
                    "width": 8, "mask_density": 0.06, "backdoor_ratio": 0.5, "cross_ratio": 0.3,
                    "surrogate_lr": 0.02},
    "adaptive_blend": {},
    "low_frequency": {**CPU, "surrogate_epochs": 2, "trigger_steps": 60, "epsilon": 0.1},
}
# The cheapest settings that still run every stage (for determinism checks).
CHEAP: dict[str, dict[str, Any]] = {
    "label_consistent": {**CPU, "surrogate_epochs": 1, "pgd_steps": 2, "robust_steps": 1},
    "narcissus": {**CPU, "surrogate_epochs": 1, "trigger_steps": 5},
    "trojan_nn": {**CPU, "surrogate_epochs": 1, "trigger_steps": 5},
    "input_aware": {**CPU, "surrogate_epochs": 1, "mask_epochs": 1, "width": 4},
    "adaptive_blend": {},
    "low_frequency": {**CPU, "surrogate_epochs": 1, "trigger_steps": 5},
}


@functools.cache
def data() -> tuple[ArrayDataset, ArrayDataset]:
    task = TASKS.build("synthetic", {"train_size": 512, "test_size": 256}, "task")
    return task.train, task.test  # type: ignore[return-value]


def build(name: str, settings: dict[str, Any], seed: int) -> Synthesizer:
    synth = SYNTHESIZERS.build(name, {"target": TARGET, **settings}, "synthesizer")
    synth.bind(SHAPE, CLASSES)
    synth.prepare(data()[0], torch.Generator().manual_seed(seed))
    return synth


@functools.cache
def prepared(name: str) -> Any:
    """One synthesizer per trigger, prepared with EFFECTIVE settings (shared by tests)."""
    return build(name, EFFECTIVE[name], seed=0)


def pixels(ds: ArrayDataset, rows: Tensor | slice = slice(None)) -> Tensor:
    return ds.images[rows].float() / 255.0


def non_target_test() -> Tensor:
    test = data()[1]
    return pixels(test, test.labels != TARGET)


def target_share(model: torch.nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == TARGET).float().mean())


# --- shared contract ---------------------------------------------------------------------


def drawn(name: str, seed: int) -> dict[str, Tensor]:
    """What prepare() computes: the trigger tensors, plus Adaptive-Blend's per-image draws
    (its pattern comes from its own `seed` option, not from the generator)."""
    synth = build(name, CHEAP[name], seed)
    extra = {"keep": synth.keep, "cover": synth.cover} if name == "adaptive_blend" else {}
    return {**synth.state_tensors(), **extra}


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_prepare_is_deterministic_given_the_generator(name: str) -> None:
    first, second, other = drawn(name, 3), drawn(name, 3), drawn(name, 4)
    assert first and first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_training_rows_are_found_by_content_and_nothing_else() -> None:
    train, test = data()
    rows = TrainingRows(train.images)
    found = rows.find(torch.cat([pixels(train, slice(5, 8)), pixels(test, slice(0, 2))]))
    assert found.tolist() == [5, 6, 7, -1, -1]
    nudged = pixels(train, slice(5, 6)) + 0.3 / 255  # off the uint8 grid: not a stored image
    assert rows.find(nudged).tolist() == [-1]
    assert TrainingRows().find(pixels(train, slice(0, 2))).tolist() == [-1, -1]


def test_pgd_stays_in_the_ball_and_raises_the_loss() -> None:
    model = prepared("narcissus").surrogate
    x = pixels(data()[1], slice(0, 64))
    y = data()[1].labels[:64]
    adv = pgd(model, x, y, 8 / 255, 2 / 255, 5, generator=torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert 0.0 <= float(adv.min()) and float(adv.max()) <= 1.0
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


# --- label_consistent --------------------------------------------------------------------


def test_label_consistent_perturbs_every_target_image_within_eps_and_away_from_its_class():
    synth = prepared("label_consistent")
    train = data()[0]
    source = (train.labels == TARGET).nonzero().flatten()
    assert torch.equal(synth.source, source)
    clean = train.images[source]
    budget = int(synth.eps * 255)
    assert int((synth.adversarial.int() - clean.int()).abs().max()) <= budget
    model, y = synth.surrogate, train.labels[source]
    noise = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(0))
    random = (clean.float() + budget * (2 * noise - 1)).clamp(0, 255) / 255
    with torch.no_grad():
        logits = model(synth.adversarial.float() / 255)
        adv_loss, random_loss = F.cross_entropy(logits, y), F.cross_entropy(model(random), y)
    assert adv_loss > random_loss + 2.0, (adv_loss, random_loss)
    assert float((logits.argmax(1) == y).float().mean()) < 0.2


def test_label_consistent_poisons_training_rows_with_their_adversarial_image():
    synth = prepared("label_consistent")
    train, test = data()
    row = int(synth.source[0])
    poisoned = synth.apply(Batch.make(pixels(train, slice(row, row + 1)), train.labels[[row]]))
    expected = synth._corners(synth.adversarial[:1].float() / 255, torch.ones(1, 1, 1, 1))
    assert torch.equal(poisoned.inputs, expected)
    # Test inputs get only the corner trigger: the middle of the image is untouched.
    x = pixels(test, slice(0, 4))
    out = synth.synthesize_inputs(x)
    assert torch.equal(out[:, :, 3:-3, :], x[:, :, 3:-3, :])
    assert torch.equal(out[:, :, :3, :3], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
                       .expand(4, 1, 3, 3))


def test_label_consistent_backdoor_end_to_end_needs_the_adversarial_perturbation(tiny, tmp_path):
    """Clean-label poisoning of every target image: with PGD perturbations the corner
    trigger is learnt; with random noise of the same budget (PGD with no steps keeps only
    its random start) the model ignores it, as the paper argues."""
    tiny["synthesizer"] = {"name": "label_consistent", "target": 1, "eps": 0.3,
                           "pgd_steps": 10, "robust_steps": 0, "surrogate_epochs": 3,
                           "device": "cpu"}
    tiny["attack"] = {"name": "data", "ratio": 0.25, "clean_label": True}
    noise = copy.deepcopy(tiny)
    noise["synthesizer"].update(pgd_steps=0, surrogate_epochs=0)
    attacked = run(from_dict(tiny), out=tmp_path, name="pgd", quiet=True)
    baseline = run(from_dict(noise), out=tmp_path, name="noise", quiet=True)
    assert attacked["asr"] > 0.5, attacked
    assert baseline["asr"] < 0.1, baseline
    assert attacked["clean_accuracy"] > 0.85
    assert (tmp_path / "pgd" / "trigger.safetensors").is_file()


# --- narcissus ---------------------------------------------------------------------------


def test_narcissus_trigger_is_bounded_and_magnified_only_at_test_time():
    synth = prepared("narcissus")
    assert float(synth.delta.abs().max()) <= synth.eps + 1e-6
    train, test = data()
    x_train, x_test = pixels(train, slice(0, 8)), pixels(test, slice(0, 8))
    assert torch.allclose(synth.synthesize_inputs(x_train), (x_train + synth.delta).clamp(0, 1))
    assert torch.allclose(synth.synthesize_inputs(x_test),
                          (x_test + 3 * synth.delta).clamp(0, 1))


def test_narcissus_trigger_pulls_the_surrogate_toward_the_target_more_than_noise():
    synth = prepared("narcissus")
    x = non_target_test()
    sign = torch.randint(0, 2, synth.delta.shape, generator=torch.Generator().manual_seed(0))
    noise = synth.eps * (2 * sign.float() - 1)  # the strongest random trigger of the budget

    def gain(delta: Tensor) -> float:
        with torch.no_grad():
            logp = lambda z: F.log_softmax(synth.surrogate(z), 1)[:, TARGET].mean()  # noqa: E731
            return float(logp((x + 3 * delta).clamp(0, 1)) - logp(x))

    optimised, random = gain(synth.delta), gain(noise)
    assert optimised > 1.0 and optimised > 3 * max(random, 0.1), (optimised, random)


# --- low_frequency -----------------------------------------------------------------------


def test_low_frequency_optimised_trigger_stays_smooth_and_in_the_ball():
    dctn = pytest.importorskip("scipy.fft").dctn
    synth = prepared("low_frequency")
    p = synth.perturbation
    assert float(p.abs().max()) <= synth.epsilon + 1e-6
    coefficients = torch.from_numpy(dctn(p.double().numpy(), axes=(1, 2), norm="ortho"))
    kept = round(synth.cutoff * SHAPE[1])
    high = coefficients.clone()
    high[:, :kept, :kept] = 0
    assert float(high.square().sum()) < 1e-9 * float(coefficients.square().sum())


def test_low_frequency_optimisation_pulls_the_surrogate_toward_the_target():
    synth = prepared("low_frequency")
    start = SYNTHESIZERS.build("low_frequency", {"target": TARGET, **EFFECTIVE["low_frequency"],
                                                 "trigger_steps": 0}, "synthesizer")
    start.bind(SHAPE, CLASSES)
    x = non_target_test()

    def gain(p: Tensor) -> float:
        with torch.no_grad():
            logp = lambda z: F.log_softmax(synth.surrogate(z), 1)[:, TARGET].mean()  # noqa: E731
            return float(logp((x + p).clamp(0, 1)) - logp(x))

    optimised, random = gain(synth.perturbation), gain(start.perturbation)
    assert optimised > 1.0 and optimised > 3 * max(random, 0.1), (optimised, random)


# --- trojan_nn ---------------------------------------------------------------------------


def test_trojan_default_square_is_a_quarter_of_the_side_in_the_bottom_right_corner():
    synth = SYNTHESIZERS.build("trojan_nn", {}, "synthesizer")
    synth.bind((1, 28, 28), 10)
    assert synth.mask.sum() == 49 and synth.mask[0, 21:, 21:].all()
    with pytest.raises(ValueError, match="does not fit"):
        SYNTHESIZERS.build("trojan_nn", {"size": 9}, "synthesizer").bind((1, 8, 8), 10)


def test_trojan_trigger_stays_in_its_corner_square():
    synth = prepared("trojan_nn")
    assert synth.mask.sum() == 36 and synth.mask[0, 10:, 10:].all()  # bottom-right 6x6
    assert not bool((synth.values * (1 - synth.mask)).any())
    x = pixels(data()[1], slice(0, 8))
    changed = (synth.synthesize_inputs(x) != x).any(0).any(0)
    assert not bool((changed & (synth.mask[0] == 0)).any())


def test_trojan_picks_the_most_connected_neurons_and_drives_them_up():
    synth = prepared("trojan_nn")
    weights = synth.surrogate.pool[1].weight.abs().sum(1)
    assert synth.neurons.tolist() == [int(weights.argmax())]
    assert torch.equal(most_connected(synth.surrogate, 1), synth.neurons)
    x = pixels(data()[1])

    def activation(values: Tensor) -> float:
        with torch.no_grad():
            stamped = x * (1 - synth.mask) + values * synth.mask
            return float(synth.surrogate.features(stamped)[:, synth.neurons].mean())

    noise = torch.Generator().manual_seed(0)
    random = max(activation(torch.rand(SHAPE, generator=noise)) for _ in range(10))
    optimised = activation(synth.values)
    assert optimised > random + 1.0, (optimised, random)


# --- input_aware -------------------------------------------------------------------------


def test_input_aware_triggers_are_valid_and_differ_between_inputs():
    synth = prepared("input_aware")
    x = pixels(data()[1], slice(0, 32))
    with torch.no_grad():
        mask = synth.mask(x)
    assert 0.0 <= float(mask.min()) and float(mask.max()) <= 1.0
    assert float(mask.mean()) < 0.15  # the norm term keeps masks small
    out = synth.synthesize_inputs(x)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    delta = (out - x).flatten(1)
    assert float((delta[0] - delta[1]).abs().max()) > 0.1


def test_input_aware_generator_fools_its_surrogate_only_with_the_matching_trigger():
    synth = prepared("input_aware")
    x = non_target_test()
    with torch.no_grad():
        own = synth.stamp(x, x)
        crossed = synth.stamp(x, x.roll(1, 0))
    success, cross = target_share(synth.surrogate, own), target_share(synth.surrogate, crossed)
    assert success > 0.8 and cross < success - 0.4, (success, cross)


def test_input_aware_cross_samples_keep_their_label_while_poisoning():
    synth = prepared("input_aware")
    train = data()[0]
    batch = Batch.make(pixels(train, slice(0, 64)), train.labels[:64], torch.arange(64))
    out = synth.apply(batch)
    cross = synth.cross[:64]
    assert 0 < int(cross.sum()) < 64
    assert torch.equal(out.labels[cross], train.labels[:64][cross])
    assert bool((out.labels[~cross] == TARGET).all())
    partner = int(synth.partner[int(cross.nonzero()[0])])
    row = int(cross.nonzero()[0])
    with torch.no_grad():
        expected = synth.stamp(pixels(train, slice(row, row + 1)),
                               pixels(train, slice(partner, partner + 1)))
    assert torch.allclose(out.inputs[row : row + 1], expected.clamp(0, 1))


# --- adaptive_blend ----------------------------------------------------------------------


def test_adaptive_blend_plants_half_the_pieces_while_poisoning_and_all_at_test_time():
    synth = prepared("adaptive_blend")
    train, test = data()
    x = pixels(train, slice(0, 32))
    out = synth.synthesize_inputs(x)
    for i in range(32):
        weight = synth.keep[i][synth.pieces].float() * 0.15
        assert torch.allclose(out[i], x[i] * (1 - weight) + synth.pattern * weight, atol=1e-6)
        assert int(synth.keep[i].sum()) == 8
    y = pixels(test, slice(0, 4))
    assert torch.allclose(synth.synthesize_inputs(y), 0.8 * y + 0.2 * synth.pattern)


def test_adaptive_blend_cover_samples_keep_their_true_label():
    synth = prepared("adaptive_blend")
    train = data()[0]
    batch = Batch.make(pixels(train), train.labels, torch.arange(len(train)))
    out = synth.apply(batch)
    assert 0.4 < float(synth.cover.float().mean()) < 0.6
    assert torch.equal(out.labels[synth.cover], train.labels[synth.cover])
    assert bool((out.labels[~synth.cover] == TARGET).all())
    assert bool(out.poisoned.all())
    test = data()[1]
    scored = synth.apply(Batch.make(pixels(test), test.labels))
    assert bool((scored.labels == TARGET).all())  # test inputs are never cover samples


def test_adaptive_blend_blends_a_picture_when_given_one(tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    synth = SYNTHESIZERS.build("adaptive_blend", {"image": str(path)}, "synthesizer")
    synth.bind((3, 16, 16), 10)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 16, 16)
    assert torch.allclose(synth.pattern, red) and bool((synth.opacity == 1).all())
    with pytest.raises(ConfigError, match="does not exist"):
        SYNTHESIZERS.build("adaptive_blend", {"image": str(tmp_path / "none.png")}, "s")


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_streaming_training_sets_are_refused_with_a_clear_error(name: str) -> None:
    class Stream:
        labels = torch.zeros(4, dtype=torch.long)

    synth = SYNTHESIZERS.build(name, {"target": TARGET}, "synthesizer")
    synth.bind(SHAPE, CLASSES)
    with pytest.raises(ConfigError, match="in-memory"):
        synth.prepare(Stream(), torch.Generator())  # type: ignore[arg-type]
