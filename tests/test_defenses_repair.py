"""Model-repair defenses NAD, ANP, I-BAU and fine-pruning's unit masks: behaviour on a small
finished attack run, the maths on hand-sized problems, generic layer discovery, config
errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoors.assembly.artifact import reopen
from backdoors.config import from_dict
from backdoors.defenses import DEFENSES, DefenseData, DefenseTarget
from backdoors.defenses.anp import ANP, NeuronPerturbation, PrunedLayer, prune_neurons
from backdoors.defenses.fine_pruning import ChannelMask
from backdoors.defenses.i_bau import implicit_hypergradient
from backdoors.defenses.layers import neuron_layers, stage_outputs
from backdoors.defenses.nad import NAD, attention_map
from backdoors.defenses.runner import clean_budget
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.models import MODELS
from backdoors.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")

# The synthetic task (4 blob classes, 16x16, tiny_cnn) with 10% data poisoning and the
# pattern trigger, target 1: the attack tests/test_defenses.py uses.
ATTACK: dict[str, Any] = {
    "name": "repaired", "seed": 0, "task": {"name": "synthetic"},
    "train": {"epochs": 4, "lr": 0.05, "tensorboard": False, "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}
# Small settings for speed. tiny_cnn has batch norm, so NAD takes the paper's learning
# rate (0.1; the defaults are set for BN-free simple_net). The synthetic model is so sure of
# clean inputs that their loss is 0 in float32: ANP needs a larger eps for its
# perturbations to register; I-BAU needs normalised (PGD) steps to find a perturbation at
# all, a norm bound near the trigger's own (about 2.5) on 16x16 inputs, where 10 finds a
# perturbation to another class, and more rounds, as the budget is one batch.
SETTINGS: dict[str, dict[str, Any]] = {
    "nad": {"lr": 0.1, "teacher_lr": 0.1},
    "anp": {"iterations": 100, "eps": 1.0},
    "i_bau": {"perturbation": "pgd", "perturbation_steps": 10, "norm_bound": 3.0,
              "rounds": 10, "lr": 0.01},
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> DefenseTarget:
    out = tmp_path_factory.mktemp("repair")
    run(from_dict(copy.deepcopy(ATTACK)), out=out, name="synthetic", quiet=True)
    return reopen(RunFolder(out / "synthetic"))


def _data(artifact: DefenseTarget) -> DefenseData:
    return DefenseData(clean=clean_budget(artifact, 0.05), num_classes=artifact.num_classes,
                       input_shape=artifact.input_shape, device=artifact.device,
                       generator=torch.Generator().manual_seed(0))


# -- behaviour -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_repair_removes_the_backdoor_and_keeps_accuracy(name, artifact):
    before = artifact.evaluate(artifact.model)
    state = {k: v.clone() for k, v in artifact.model.state_dict().items()}
    repaired = DEFENSES.build(name, SETTINGS[name], "defense").repair(
        artifact.model, _data(artifact)).model
    after = artifact.evaluate(repaired)
    assert before["asr"] > 0.95 and before["clean_accuracy"] > 0.95
    assert after["asr"] < 0.3
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.05
    # The model passed in is not modified.
    assert repaired is not artifact.model
    assert all(torch.equal(v, artifact.model.state_dict()[k]) for k, v in state.items())


def test_nad_distils_the_stage_outputs_of_the_model(artifact):
    result = NAD(epochs=1, teacher_epochs=1).repair(artifact.model, _data(artifact))
    names = [n for n, _ in stage_outputs(artifact.model, artifact.input_shape)]
    assert result.figures["attention_layers"] == names and len(names) == 2


# -- I-BAU's hypergradient -----------------------------------------------------------------


def _tiny_problem() -> dict[str, Any]:
    """A linear classifier (3 classes, 4 features), a strongly convex inner problem in δ
    (-CE on one batch + |δ|²) and an outer loss on another batch, in float64."""
    g = torch.Generator().manual_seed(0)
    w = (0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    b = (0.1 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_(True)
    x1, x2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(
        5, 4, generator=g, dtype=torch.float64)
    y1, y2 = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 0, 1, 1, 0])

    def inner(d, w=w, b=b):
        return -F.cross_entropy((x1 + d) @ w.T + b, y1) + d.pow(2).sum()

    def outer(d, w=w, b=b):
        return F.cross_entropy((x2 + d) @ w.T + b, y2)

    return {"w": w, "b": b, "inner": inner, "outer": outer}


def _solve(inner, w, b, steps: int = 100) -> torch.Tensor:
    """δ*(w, b) by plain gradient descent (the problem is strongly convex)."""
    d = torch.zeros(4, dtype=torch.float64)
    for _ in range(steps):
        d.requires_grad_(True)
        (grad,) = torch.autograd.grad(inner(d, w, b), d)
        d = (d - 0.2 * grad).detach()
    return d


def test_implicit_hypergradient_matches_finite_differences():
    p = _tiny_problem()
    w, b, inner, outer = p["w"], p["b"], p["inner"], p["outer"]
    delta = _solve(inner, w, b)
    grads = implicit_hypergradient([w, b], delta, inner, outer, step=0.2, iterations=200)
    h = 1e-5
    for param, grad in zip([w, b], grads, strict=True):
        numeric = torch.zeros_like(param)
        for i in range(param.numel()):
            values = []
            for sign in (1, -1):
                shifted = [t.detach().clone() for t in (w, b)]
                target = shifted[0] if param is w else shifted[1]
                target.view(-1)[i] += sign * h
                values.append(float(outer(_solve(inner, *shifted), *shifted)))
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * h)
        assert torch.allclose(grad, numeric, rtol=1e-4, atol=1e-7)
    # The implicit term matters: the partial gradient alone (no fixed-point steps) differs.
    partial = implicit_hypergradient([w, b], delta, inner, outer, step=0.2, iterations=0)
    assert (partial[0] - grads[0]).abs().max() > 1e-3


# -- ANP's masks ---------------------------------------------------------------------------


def _simple_net() -> nn.Module:
    return MODELS.build("simple_net", {}, "model", num_classes=3, input_shape=(1, 12, 12),
                        mean=[0.5], std=[0.5]).eval()


def test_anp_masks_the_conv_and_hidden_linear_layers():
    model = _simple_net()
    names = [n for n, _ in neuron_layers(model)]
    assert names == ["body.0", "body.3", "pool.1"]  # two convs and the hidden layer
    units = ANP().neurons(model, (1, 12, 12))
    channels = ANP(granularity="channel").neurons(model, (1, 12, 12))
    assert [tuple(m.shape) for m in units.masks] == [(20, 12, 12), (50, 6, 6), (500,)]
    assert [tuple(m.shape) for m in channels.masks] == [(20, 1, 1), (50, 1, 1), (500,)]


def test_anp_mask_and_perturbation_rewrite_the_right_neurons():
    model = _simple_net()
    layers = neuron_layers(model)
    conv = layers[0][1]
    neurons = NeuronPerturbation(layers, [(20, 1, 1), (50, 1, 1), (500,)])
    x = torch.rand(2, 1, 12, 12)
    seen: list[torch.Tensor] = []  # what the layer after the conv receives
    hook = model.body[1].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with torch.no_grad():
        plain = model(x)
        neurons.masks[0][3] = 0.0  # conv channel 3 loses its weighted input
        neurons.weight_noise[0][5] = 0.5  # channel 5: weighted input x (1 + 0.5) ...
        neurons.bias_noise[0][5] = -1.0  # ... and no bias
        with neurons.applied():
            neurons.perturbed = True
            model(x)
        neurons.perturbed = False
        with neurons.applied():
            model(x)
    hook.remove()
    raw, perturbed, masked = seen[0], seen[1], seen[2]
    bias = conv.bias.view(1, -1, 1, 1)
    assert torch.allclose(perturbed[:, 3], bias[:, 3].expand_as(perturbed[:, 3]))
    assert torch.allclose(perturbed[:, 5], 1.5 * (raw[:, 5] - bias[:, 5]))
    assert torch.allclose(perturbed[:, 6], raw[:, 6])
    assert torch.allclose(masked[:, 5], raw[:, 5])  # perturbations off: only the mask acts
    with torch.no_grad():
        assert torch.allclose(model(x), plain)  # hooks removed with the context


def test_pruned_layers_output_only_their_bias():
    model = _simple_net()
    pruned = [torch.zeros(20, 12, 12, dtype=torch.bool), torch.zeros(50, 6, 6, dtype=torch.bool),
              torch.zeros(500, dtype=torch.bool)]
    pruned[0][2, 4, 5] = True
    pruned[2][7] = True
    out = prune_neurons(copy.deepcopy(model), ["body.0", "body.3", "pool.1"], pruned)
    assert isinstance(out.body[0], PrunedLayer) and isinstance(out.pool[1], PrunedLayer)
    assert isinstance(out.body[3], nn.Conv2d)  # nothing pruned there: left as it was
    x = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        conv_out = out.body[0](x)
        reference = model.body[0](x)
    assert torch.allclose(conv_out[:, 2, 4, 5], model.body[0].bias[2].expand(2))
    keep = ~pruned[0]
    assert torch.equal(conv_out[:, keep], reference[:, keep])


# -- fine-pruning's unit masks -------------------------------------------------------------


def test_unit_mask_zeroes_single_positions():
    x = torch.rand(2, 3, 4, 4) + 0.1
    mask = torch.ones(3, 4, 4)
    mask[1, 0, 3] = 0.0
    out = ChannelMask(mask)(x)
    assert not out[:, 1, 0, 3].any()
    assert int((out == 0).sum()) == 2 and torch.equal(out[:, 0], x[:, 0])


# -- generic layer discovery ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape", "expected"), [
    ("simple_net", (1, 28, 28), ["body.1", "body.4"]),
    ("tiny_cnn", (1, 16, 16), ["body.5", "body.9"]),
    ("resnet18", (3, 32, 32), ["body.layer1.1", "body.layer2.1", "body.layer3.1",
                               "body.layer4.1"]),
    ("preact_resnet18", (3, 32, 32), ["body.layer1.1", "body.layer2.1", "body.layer3.1",
                                      "body.relu"]),
    ("vgg11", (3, 32, 32), ["body.2", "body.6", "body.13", "body.20", "body.27"]),
])
def test_stage_outputs_are_the_blocks_ending_each_resolution(name, shape, expected):
    kwargs = {"width": 4} if "resnet" in name else {"width_scale": 0.0625} if "vgg" in name else {}
    model = MODELS.build(name, kwargs, "model", num_classes=10, input_shape=shape,
                         mean=[0.5] * shape[0], std=[0.5] * shape[0])
    assert [n for n, _ in stage_outputs(model, shape)] == expected
    x = torch.rand(2, *shape)
    maps = []
    for _, module in stage_outputs(model, shape):
        module.register_forward_hook(lambda m, i, o: maps.append(attention_map(o)))
    model.eval()(x)
    assert all(torch.allclose(a.norm(dim=1), torch.ones(2)) for a in maps)


# -- config errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("anp", {"epss": 0.1}, "unknown key 'epss'.*did you mean 'eps'"),
    ("anp", {"granularity": "neuron"}, "granularity"),
    ("anp", {"fraction": 1.5}, "fraction must be in"),
    ("nad", {"beta": -1}, "beta must be >= 0"),
    ("nad", {"teacher_lr": 0}, "teacher_lr must be > 0"),
    ("i_bau", {"portion": 0}, "portion in"),
    ("i_bau", {"perturbation": "fgsm"}, "perturbation"),
    ("i_bau", {"fixed_point_step": 3}, "did you mean 'fixed_point_steps'"),
    ("fine_pruning", {"granularity": "pixel"}, "granularity"),
])
def test_bad_options_name_the_key(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DEFENSES.build(name, kwargs, f"defense '{name}'")


def test_nad_unknown_layer_names_it(artifact):
    with pytest.raises(ConfigError, match=r"layers names 'body.55'.*did you mean 'body.5'"):
        NAD(layers=["body.55"], epochs=0, teacher_epochs=0).repair(
            artifact.model, _data(artifact))
