"""Backdoors 101 compatibility: flat configs convert, and training.py prints the old lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backdoors.config import from_dict, load_config
from backdoors.config.compat import LEGACY_KEYS, convert_legacy, is_legacy
from backdoors.errors import ConfigError
from backdoors.legacy import legacy_lines

REPO = Path(__file__).resolve().parents[1]


def test_original_mnist_config_converts():
    cfg = load_config(REPO / "configs" / "mnist_params.yaml")
    assert cfg.task.name == "mnist" and cfg.synthesizer.kwargs["target"] == 8
    assert cfg.attack.name == "blind"
    assert cfg.attack.kwargs["loss_terms"] == ["backdoor", "normal"]
    assert cfg.attack.kwargs["balancer"] == {"name": "mgda", "normalize": "loss"}
    assert cfg.train.epochs == 350 and cfg.train.weight_decay == 0.0005


def test_original_cifar_config_converts():
    cfg = load_config(REPO / "configs" / "cifar10_params.yaml")
    assert cfg.task.name == "cifar10" and cfg.train.scheduler == "cosine"
    assert cfg.attack.kwargs["fraction"] == 1.1 and cfg.attack.kwargs["loss_threshold"] == 1.0
    assert cfg.attack.kwargs["balancer"]["normalize"] == "loss+"
    assert cfg.train.save_on_epochs == [10, 50, 100]


def test_every_spec_key_is_accepted():
    values = {k: None for k in LEGACY_KEYS}
    values.update(task="MNIST", synthesizer="SinglePixel", loss_tasks=["normal"], fl=False,
                  dp=False, lr=0.1, optimizer="Adam", scheduler_milestones=[3, 5],
                  loss_balance="fixed", fixed_scales={"normal": 1.0}, backdoor_label=3,
                  backdoor_dynamic_position=True, random_seed=7, max_batch_id=10)
    native = convert_legacy(values)
    cfg = from_dict(native)
    assert cfg.seed == 7 and cfg.synthesizer.name == "single_pixel"
    assert cfg.train.scheduler == "multistep" and cfg.train.milestones == [3, 5]
    assert cfg.train.optimizer == "adam" and cfg.train.max_batches == 10
    assert cfg.attack.kwargs["balancer"] == {"name": "fixed", "scales": {"normal": 1.0}}
    assert cfg.synthesizer.kwargs == {"target": 3, "dynamic": True}


def test_detection():
    assert is_legacy({"task": "MNIST", "lr": 0.1, "loss_tasks": ["normal"]})
    assert not is_legacy({"task": {"name": "mnist"}, "train": {"lr": 0.1}})


@pytest.mark.parametrize("data, needle", [
    ({"task": "MNIST", "lr": 0.1, "lrr": 0.2}, "unknown legacy key 'lrr'"),
    ({"task": "MNISTT", "lr": 0.1}, "did you mean 'mnist'"),
    ({"task": "MNIST", "lr": 0.1, "loss_balance": "magic"}, "loss_balance"),
])
def test_bad_legacy_values(data, needle):
    with pytest.raises(ConfigError) as info:
        convert_legacy(data)
    assert needle in str(info.value)


def test_legacy_lines_format():
    row = {"clean_accuracy": 0.98765, "clean_loss": 0.0512, "backdoor_accuracy": 1.0,
           "backdoor_loss": 0.001}
    assert legacy_lines(3, row) == [
        "Backdoor False. Epoch: 3. Accuracy: Top-1: 98.77 | Loss: value: 0.05",
        "Backdoor True . Epoch: 3. Accuracy: Top-1: 100.00 | Loss: value: 0.00",
    ]


def _mnist_dir(tmp_path):
    """Four tiny MNIST-layout IDX files made from the synthetic task, resized to 28x28."""
    import torch.nn.functional as F

    from backdoors.data import TASKS
    from backdoors.data.mnist import write_idx

    task = TASKS.build("synthetic", {"num_classes": 4, "train_size": 256, "test_size": 128},
                       "task")
    for split, ds in (("train", task.train), ("t10k", task.test)):
        big = F.interpolate(ds.images.float(), size=28).round().byte()[:, 0]
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", big.numpy())
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", ds.labels.byte().numpy())
    return tmp_path


def test_training_py_runs_an_original_style_config(tmp_path):
    data = _mnist_dir(tmp_path / "data")
    params = yaml.safe_load((REPO / "configs" / "mnist_params.yaml").read_text())
    params.update(epochs=2, data_path=str(data), backdoor_label=1, save_on_epochs=[1])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, str(REPO / "training.py"), "--name", "mnist", "--params", "p.yaml",
         "--commit", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Backdoor False. Epoch: 1. Accuracy: Top-1: ")
    assert lines[1].startswith("Backdoor True . Epoch: 1. Accuracy: Top-1: ")
    assert any(p.name.startswith("events") for p in (tmp_path / "runs" / "mnist").iterdir())
    (folder,) = (tmp_path / "saved_models").iterdir()
    assert {"model_last.pt.tar", "model_last.pt.tar.best", "model_last.pt.tar.epoch_1"} <= {
        p.name for p in folder.iterdir()}
    import torch

    ckpt = torch.load(folder / "model_last.pt.tar", weights_only=True)
    assert ckpt["epoch"] == 2 and "state_dict" in ckpt
    native = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("mnist-")]
    assert len(native) == 1 and (native[0] / "summary.json").is_file()
    # resume_model continues at the next epoch (the original restarted the count).
    params.update(epochs=3, resume_model=str(folder / "model_last.pt.tar"), save_model=False)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, str(REPO / "training.py"), "--name", "again", "--params", "p.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("Backdoor False. Epoch: 3.")


def test_training_py_bad_key_is_one_line(tmp_path):
    (tmp_path / "p.yaml").write_text("task: MNIST\nlr: 0.1\nlearning_rate: 0.1\n")
    proc = subprocess.run([sys.executable, str(REPO / "training.py"), "--name", "x", "--params",
                           "p.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_legacy_evasion_loss_tasks_map_to_terms_with_options():
    from backdoors.assembly.build import build

    native = convert_legacy({"task": "MNIST", "lr": 0.1, "nc_p_norm": 2,
                             "spectral_similarity": "cosine",
                             "loss_tasks": ["normal", "backdoor", "neural_cleanse_part1",
                                            "mask_norm", "neural_cleanse", "spectral_evasion",
                                            "sentinet_evasion"]})
    assert native["attack"]["loss_terms"] == [
        "normal", "backdoor", {"name": "neural_cleanse", "p_norm": 2}, "mask_norm",
        {"name": "spectral_evasion", "similarity": "cosine"}, "sentinet_evasion"]
    build(from_dict(native))


def test_legacy_mask_norm_without_neural_cleanse_is_refused():
    from backdoors.assembly.build import build

    native = convert_legacy({"task": "MNIST", "lr": 0.1,
                             "loss_tasks": ["normal", "backdoor", "mask_norm"]})
    assert native["attack"]["loss_terms"] == ["normal", "backdoor", "mask_norm"]
    with pytest.raises(ConfigError, match="'mask_norm'.*'neural_cleanse'"):
        build(from_dict(native))
