"""Mixed precision, channels_last and torch.compile (train.precision, train.channels_last,
train.compile; docs/precision.md)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from support import StopAfter

from backdoors.assembly.build import build, fingerprint, resolved_config
from backdoors.attacks.balancers import MGDABalancer
from backdoors.cli import main
from backdoors.config import from_dict
from backdoors.errors import ConfigError
from backdoors.execution import Accelerated, LossScaler, autocast
from backdoors.execution import compiled as compiled_module
from backdoors.experiment import Interrupted, resume, run
from backdoors.runs import RunFolder, load_commit, load_weights, save_commit

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def quickstart(epochs: int) -> dict:
    """configs/quickstart.yaml (blind attack with MGDA on digits), shortened."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["train"].update(epochs=epochs, tensorboard=False, progress=False)
    return config


@pytest.fixture
def blind(tiny):
    tiny["attack"] = {"name": "blind"}
    return tiny


@pytest.mark.parametrize("task", ["synthetic", "digits"])
def test_bf16_trains_as_well_as_fp32(task, blind, tmp_path, one_thread):
    config = blind if task == "synthetic" else quickstart(4)
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = copy.deepcopy(config)
        cfg["train"]["precision"] = precision
        results[precision] = run(from_dict(cfg), out=tmp_path, name=precision, quiet=True)
    fp32, bf16 = results["fp32"], results["bf16"]
    assert abs(fp32["clean_accuracy"] - bf16["clean_accuracy"]) <= 0.01
    assert fp32["asr"] > 0.9 and bf16["asr"] > 0.9




def test_fp16_scaler_state_is_checkpointed_and_restored(blind, tmp_path, one_thread):
    blind["train"].update(precision="fp16", max_batches=2, epochs=2)
    with pytest.raises(Interrupted):
        run(from_dict(blind), out=tmp_path, name="part", hooks=[StopAfter(1)], quiet=True)
    folder = RunFolder(tmp_path / "part")
    commit = load_commit(folder)
    assert commit is not None and commit["loop"]["scaler"]["scale"] == 65536.0
    # A scale no fresh scaler has: the resumed run must carry it on.
    commit["loop"]["scaler"]["scale"] = 1024.0
    save_commit(folder, {k: v for k, v in commit.items() if k != "format"})
    assert resume(tmp_path / "part", quiet=True)["status"] == "completed"
    assert load_commit(folder)["loop"]["scaler"]["scale"] == 1024.0


def test_channels_last_run_completes(blind, tmp_path, one_thread):
    blind["train"].update(channels_last=True, epochs=1)
    summary = run(from_dict(blind), out=tmp_path, name="cl", quiet=True)
    assert summary["status"] == "completed" and summary["clean_accuracy"] > 0.5


def test_compiled_run_saves_plain_weights(blind, tmp_path, monkeypatch, one_thread):
    # The eager backend traces with dynamo but generates no code: seconds, not a minute.
    monkeypatch.setattr(compiled_module, "BACKEND", "eager")
    blind["train"].update(compile=True, epochs=1)
    summary = run(from_dict(blind), out=tmp_path, name="compiled", quiet=True)
    assert summary["status"] == "completed" and "compile_fallback" not in summary
    weights = load_weights(tmp_path / "compiled" / "checkpoints" / "last.safetensors")
    assert not any(k.startswith("_orig_mod.") for k in weights)


def failing_backend(graph, inputs):
    raise RuntimeError("no C compiler here\nand a second line")


def test_compile_failure_falls_back_with_one_line(blind, tmp_path, monkeypatch, capsys,
                                                  one_thread):
    monkeypatch.setattr(compiled_module, "BACKEND", failing_backend)
    blind["train"].update(compile=True, epochs=1)
    summary = run(from_dict(blind), out=tmp_path, name="fallback", quiet=True)
    assert summary["status"] == "completed"
    assert "no C compiler here" in summary["compile_fallback"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.compile" in line]
    assert len(lines) == 1 and "second line" not in lines[0]


@pytest.mark.slow
def test_inductor_compiled_run(blind, tmp_path, one_thread):
    """The real compiler (a minute or more on a small CPU): -m slow."""
    blind["model"] = {"name": "simple_net"}
    blind["train"].update(compile=True, epochs=1, max_batches=2)
    summary = run(from_dict(blind), out=tmp_path, name="inductor", quiet=True)
    assert summary["status"] == "completed"


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
        self.head = torch.nn.Linear(36, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_wrapper_reads_the_models_attributes_through():
    model = Net()
    forward = Accelerated(model, CPU, "bf16", channels_last=True)
    assert forward.head is model.head and forward.features is model.features
    assert list(forward.parameters()) == list(model.parameters())
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert forward(torch.rand(2, 3, 5, 5)).dtype == torch.float32


def mgda_losses(precision: str) -> tuple[dict[str, torch.Tensor], list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    x, y = torch.rand(16, 12), torch.randint(0, 3, (16,))
    with autocast(CPU, precision):
        clean, backdoor = model(x), model(x + 0.5)
    losses = {"normal": F.cross_entropy(clean.float(), y),
              "backdoor": F.cross_entropy(backdoor.float(), torch.zeros_like(y))}
    return losses, list(model.parameters())


@pytest.mark.parametrize("normalize", ["loss", "loss+", "l2"])
def test_mgda_solves_on_unscaled_gradients_under_fp16(normalize):
    balancer = MGDABalancer(normalize)
    losses, params = mgda_losses("fp32")
    plain = balancer.backward(losses, params)
    plain_grads = [p.grad.clone() for p in params]
    losses, params = mgda_losses("fp32")
    scaler = LossScaler("fp16", CPU)
    with scaler.scope():
        weights = balancer.backward(losses, params)
    assert weights == pytest.approx(plain, rel=1e-5)
    # The update stays scaled, for the scaler's optimizer step to divide out.
    for p, g in zip(params, plain_grads, strict=True):
        assert torch.allclose(p.grad, g * 65536.0, rtol=1e-4, atol=1e-3)


def test_mgda_under_bf16_matches_fp32():
    balancer = MGDABalancer("loss")
    fp32 = balancer.weights(*mgda_losses("fp32"))
    bf16 = balancer.weights(*mgda_losses("bf16"))
    assert bf16 == pytest.approx(fp32, abs=0.05)


def test_mgda_overflowed_step_reports_uniform_weights():
    losses, params = mgda_losses("fp32")
    scaler = LossScaler("fp16", CPU)
    scaler.scaler._scale = torch.tensor(float("inf"))  # every scaled gradient overflows
    with scaler.scope():
        weights = MGDABalancer("loss").backward(losses, params)
    assert weights == {"normal": 0.5, "backdoor": 0.5}


def test_dp_runs_in_bf16(tiny, tmp_path, one_thread):
    tiny["model"] = {"name": "simple_net"}
    tiny["train"].update(dp=True, precision="bf16", epochs=1, max_batches=2)
    assert run(from_dict(tiny), out=tmp_path, name="dp", quiet=True)["status"] == "completed"


@pytest.mark.parametrize(("train", "message"), [
    ({"precision": "fp8"}, "bad value for train.precision: 'fp8' is not one of 'fp32', "
                           "'bf16', 'fp16'"),
    ({"channels_last": "yes"}, "bad value for train.channels_last: 'yes' is not true/false"),
    ({"compile": 1}, "bad value for train.compile: 1 is not true/false"),
    ({"dp": True, "precision": "fp16"}, "train.dp cannot run with train.precision: fp16"),
    ({"dp": True, "channels_last": True}, "train.dp cannot run with train.channels_last"),
])
def test_bad_values_are_one_line(tiny, train, message):
    tiny["train"].update(train)
    with pytest.raises(ConfigError) as err:
        from_dict(tiny)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_precision_exits_2(tiny, tmp_path, capsys):
    tiny["train"]["precision"] = "fp8"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main(["train", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.precision" in err[0]


def test_runs_made_before_the_options_keep_their_fingerprint(tiny):
    config = from_dict(tiny)
    resolved = resolved_config(config, build(config, fresh=False))
    older = copy.deepcopy(resolved)
    for key in ("precision", "channels_last", "compile"):
        del older["train"][key]
    assert fingerprint(resolved) == fingerprint(older)
    resolved["train"]["precision"] = "bf16"
    assert fingerprint(resolved) != fingerprint(older)
