"""Every shipped config runs as its header says: each validates, and each MNIST one starts
training on the project's split prepared by `backdoors data mnist-split` (when the shared
data is present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from backdoors.cli import main
from backdoors.config import load_config
from backdoors.experiment import run

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))  # with the profiles in subfolders (fast/)


def _trains_on_mnist(path: Path) -> bool:
    task = (yaml.safe_load(path.read_text()) or {}).get("task")
    data_dir = task.get("data_dir", "") if isinstance(task, dict) else ""
    return "mnist-split" in str(data_dir) or path.name == "mnist_params.yaml"


# Configs whose victim trains on the MNIST split (edge_case only borrows MNIST 7s as its
# source of poison for a CIFAR-10 victim).
MNIST = [p for p in CONFIGS if _trains_on_mnist(p)]
# Triggers optimised on data before training (surrogate models, generators): minutes on a
# CPU even for two batches, so they run with the slow tests.
OPTIMISED = {"trojan_nn.yaml", "input_aware.yaml", "low_frequency.yaml", "narcissus.yaml",
             "label_consistent.yaml", "physical.yaml", "counting_complex.yaml",
             "multimnist_calculator.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_config_validates_on_the_command_line(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("data") / "mnist-split"
    assert main(["data", "mnist-split", "--from", str(shared_data / "mnist-t10k"), "--to",
                 str(out)]) == 0
    return out


@pytest.mark.real_data
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow)
                                  if p.name in OPTIMISED else p for p in MNIST],
                         ids=lambda p: p.name)
def test_each_mnist_config_starts_training(path, split, tmp_path, one_thread):
    overrides = [f"task.data_dir={split}", "train.epochs=1", "train.max_batches=2",
                 "train.tensorboard=false", "train.progress=false",
                 "task.max_test_samples=200"]
    text = path.read_text()
    if "federated" in yaml.safe_load(text) or "fl: true" in text.lower():
        overrides += ["federated.rounds=1"]
    if "source_task" in text:
        overrides += [f"synthesizer.source_task.data_dir={split}"]
    summary = run(load_config(path, overrides), out=tmp_path, name="r", quiet=True)
    assert summary["status"] == "completed"
