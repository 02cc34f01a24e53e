"""Defenses with their own training loops follow the run's precision (docs/precision.md):
each runs in fp32 and bf16 on a small finished attack run, the bf16 loops really run under
autocast, and fp16 (CPU autocast supports float16 on torch 2.13) steps with the loss
scaler."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_defenses_repair import ATTACK
from torch import nn

from backdoors.assembly.artifact import reopen
from backdoors.config import TrainConfig, from_dict
from backdoors.defenses import DEFENSES, DefenseData, DefenseTarget
from backdoors.defenses.ft_sam import sam_gradients
from backdoors.defenses.runner import clean_budget
from backdoors.defenses.target import TrainingBudget
from backdoors.execution import LossScaler
from backdoors.experiment import run
from backdoors.models import MODELS
from backdoors.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")

# Small settings for speed (a few steps each), on tests/test_defenses_repair.py's attack
# (the synthetic task, tiny_cnn, 10% pattern poisoning). ANP and I-BAU take that file's
# larger eps and PGD steps: the model is so sure of clean inputs that their loss is 0.
REPAIRS: dict[str, dict[str, Any]] = {
    "ft_sam": {"epochs": 3, "batch_size": 64, "lr": 0.05},
    "sau": {"epochs": 2, "batch_size": 64, "lr": 1e-3},
    "npd": {"epochs": 2, "batch_size": 64},
    "anp": {"iterations": 20, "eps": 1.0},
    "i_bau": {"perturbation": "pgd", "perturbation_steps": 3, "norm_bound": 3.0,
              "rounds": 2, "lr": 0.01},
    "rnp": {"unlearning_epochs": 2, "recovering_epochs": 2},
    "bti_dbf": {"rounds": 1, "mask_epochs": 2, "generator_epochs": 2, "unlearn_epochs": 2,
                "generator_width": 4, "generator_levels": 2},
}
# Training defenses train a fresh tiny_cnn on the poisoned training set.
TRAININGS: dict[str, dict[str, Any]] = {
    "abl": {"isolation_epochs": 1, "unlearning_epochs": 1},
    "asd": {"iterations": 4},
    "dbd": {"self_epochs": 1, "self_batch_size": 64, "warmup_epochs": 1, "iterations": 4},
}
TRAINING_EPOCHS = 2
# DBD's SimCLR cannot learn the blob task (its classes are positions, which random crops
# move: docs/defenses_training.md), so its accuracy after 2 epochs (about 47%) is noise.
NO_ACCURACY = {"dbd"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> DefenseTarget:
    out = tmp_path_factory.mktemp("precision")
    run(from_dict(copy.deepcopy(ATTACK)), out=out, name="synthetic", quiet=True)
    return reopen(RunFolder(out / "synthetic"))


def _data(artifact: DefenseTarget, precision: str) -> DefenseData:
    return DefenseData(clean=clean_budget(artifact, 0.05), num_classes=artifact.num_classes,
                       input_shape=artifact.input_shape, device=artifact.device,
                       generator=torch.Generator().manual_seed(0), train=artifact.train,
                       precision=precision)


def _spy(model: nn.Module) -> list[torch.dtype]:
    """The dtypes of the last Linear's outputs from now on (the hook survives the deep
    copies defenses make)."""
    seen: list[torch.dtype] = []
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    last.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    return seen


def _defend(name: str, artifact: DefenseTarget, precision: str
            ) -> tuple[nn.Module, list[torch.dtype]]:
    """(the defended model, the dtypes its last layer produced on the way)."""
    data = _data(artifact, precision)
    if name in REPAIRS:
        model = copy.deepcopy(artifact.model)
        seen = _spy(model)
        return DEFENSES.build(name, REPAIRS[name], "defense").repair(model, data).model, seen
    torch.manual_seed(0)
    model = MODELS.build("tiny_cnn", {}, "model", num_classes=artifact.num_classes,
                         input_shape=artifact.input_shape, mean=(0.5,) * artifact.input_shape[0],
                         std=(0.5,) * artifact.input_shape[0])
    seen = _spy(model)
    budget = TrainingBudget(TrainConfig(epochs=TRAINING_EPOCHS, batch_size=128))
    trained = DEFENSES.build(name, TRAININGS[name], "defense").train(model, data, budget)
    return trained.model, seen


def _finite(model: nn.Module) -> bool:
    return all(bool(t.isfinite().all()) for t in model.state_dict().values()
               if t.is_floating_point())


@pytest.mark.parametrize("name", sorted(REPAIRS) + sorted(TRAININGS))
def test_bf16_runs_under_autocast_and_agrees_with_fp32(name, artifact):
    fp32, seen32 = _defend(name, artifact, "fp32")
    bf16, seen16 = _defend(name, artifact, "bf16")
    assert torch.bfloat16 not in seen32
    # The loop's forward passes ran under bf16 autocast (evaluation stays fp32): fails
    # if the defense ignored data.precision.
    assert torch.bfloat16 in seen16, name
    assert _finite(fp32) and _finite(bf16)
    if name not in NO_ACCURACY:
        acc32 = artifact.evaluate(fp32)["clean_accuracy"]
        acc16 = artifact.evaluate(bf16)["clean_accuracy"]
        assert acc32 > 0.9 and abs(acc16 - acc32) <= 0.05, (acc32, acc16)


# The first fp16 steps overflow at the initial scale and are skipped, so a schedule steps
# before its optimizer has: torch warns, as it does in any fp16 training.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_fp16_steps_through_the_loss_scaler(artifact, monkeypatch):
    """fp16 on the CPU (torch 2.13 autocasts convolutions and linears to float16 there):
    the loops run under fp16 autocast and step through the GradScaler."""
    steps: list[str] = []
    original = torch.amp.GradScaler.step

    def step(self: torch.amp.GradScaler, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        steps.append(type(optimizer).__name__)
        return original(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", step)
    # The quick ones: fp16 has no native arithmetic on this CPU (ABL, NPD: 10-30 s).
    for name in ("ft_sam", "sau", "bti_dbf", "rnp"):
        steps.clear()
        model, seen = _defend(name, artifact, "fp16")
        assert torch.float16 in seen and steps, name
        assert _finite(model)
        if name == "ft_sam":  # not every step skipped: the model moved, and stayed good
            assert any(not torch.equal(v, artifact.model.state_dict()[k])
                       for k, v in model.state_dict().items())
            assert artifact.evaluate(model)["clean_accuracy"] > 0.9


def test_scaled_sam_gradient_is_the_scale_times_the_true_one():
    """Under fp16 FT-SAM differentiates the scaled loss: the same ε (it depends on
    g / ||T g|| only), a gradient the scaler's step divides back; an overflowed first
    gradient comes back as is (the step is skipped) with the weights untouched."""
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)

    def loss_fn(perturbed: bool, factor: float = 1.0) -> torch.Tensor:
        return factor * ((w - 0.3) ** 2 * torch.tensor([1.0, 2.0, 3.0])).sum()

    scaler = LossScaler("fp16", torch.device("cpu"))
    scale = float(scaler.scaler.get_scale())
    start = w.detach().clone()
    loss, (plain,) = sam_gradients([w], loss_fn, rho=0.2)
    with torch.no_grad():  # restoring w + ε - ε may leave a rounding error
        w.copy_(start)
    with scaler.scope():
        loss_s, (grad,) = sam_gradients([w], loss_fn, rho=0.2)
    assert float(loss_s) == float(loss)
    torch.testing.assert_close(grad, scale * plain)
    before = w.detach().clone()
    with scaler.scope():
        _, (overflowed,) = sam_gradients([w], lambda p: loss_fn(p, 1e36), rho=0.2)
    assert not bool(overflowed.isfinite().all())
    assert torch.equal(w.detach(), before)
