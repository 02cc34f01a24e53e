"""Every shipped config runs as its header says: each validates (configs/bench/** included),
each MNIST one starts training on the project's split prepared by `backdoors data
mnist-split` (when the shared data is present), and the BackdoorBench protocol configs
keep the protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from backdoors.cli import main
from backdoors.config import load_config
from backdoors.experiment import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
BENCH = sorted((ROOT / "configs" / "bench").rglob("*.yaml"))
BENCH_DATASETS = ("cifar10", "cifar100", "gtsrb", "tiny_imagenet")
BENCH_ATTACKS = ("badnets", "blended", "blind", "bpp", "input_aware", "label_consistent",
                 "low_frequency", "sig", "trojan_nn", "wanet")


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


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


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
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


def test_bench_grid_is_complete():
    assert {_id(p) for p in BENCH} == {f"bench/{d}/{a}.yaml" for d in BENCH_DATASETS
                                       for a in BENCH_ATTACKS}


@pytest.mark.parametrize("path", BENCH, ids=_id)
def test_bench_config_keeps_the_protocol(path):
    data = yaml.safe_load(path.read_text())
    dataset, attack = path.parent.name, path.stem
    assert data["task"]["name"] == dataset and data["task"].get("download") is True
    assert data["model"] == {"name": "preact_resnet18"}
    assert data["train"] == {"epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.01,
                             "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "cosine"}
    assert data["synthesizer"]["target"] == 0
    assert data["synthesizer"].get("label_mode", "all_to_one") == "all_to_one"
    injection = data["attack"]
    if attack == "blind":  # loss poisoning: no data is poisoned, every batch gets a copy
        assert injection["name"] == "blind"
    elif attack == "input_aware":  # 10% backdoor + 10% cross-trigger rows per batch
        assert injection == {"name": "batch", "fraction": 0.2}
        assert data["synthesizer"]["backdoor_ratio"] == data["synthesizer"]["cross_ratio"] == 0.1
    elif attack == "wanet":  # 10% warped rows per batch (and twice as many noise rows)
        assert injection == {"name": "batch", "fraction": 0.1}
        assert data["synthesizer"]["noise"] is True and data["synthesizer"]["cross_ratio"] == 2
    elif attack in ("sig", "label_consistent"):  # 10% of the set, capped by the target class
        assert injection == {"name": "data", "ratio": 0.1, "clean_label": True}
    else:
        assert injection == {"name": "data", "ratio": 0.1}


@pytest.mark.parametrize("path", BENCH, ids=_id)
def test_bench_config_header_quotes_the_leaderboard(path):
    """The header's BackdoorBench figure is the bundled leaderboard's cell for the config,
    which is also what `backdoors report` shows next to it."""
    from backdoors.report.reference import lookup

    text = path.read_text()
    found = lookup(yaml.safe_load(text), None)
    if found is None:
        assert "no figure published" in text
    else:
        assert (f"clean accuracy {100 * found['clean_accuracy']:.2f}%, "
                f"ASR {100 * found['asr']:.2f}%") in text
    assert f"backdoors train configs/{_id(path)}" in text


def test_cifar10_bench_sweep_runs_the_cifar10_protocol_configs():
    from backdoors.sweeps.cells import cells
    from backdoors.sweeps.grid import load_grid

    grid = load_grid(ROOT / "sweeps" / "cifar10_bench.yaml")
    assert [case.name for case in grid.cases] == list(BENCH_ATTACKS)
    base = yaml.safe_load((ROOT / "configs" / "bench" / "cifar10" / "badnets.yaml").read_text())
    for case in grid.cases:
        config = yaml.safe_load(
            (ROOT / "configs" / "bench" / "cifar10" / f"{case.name}.yaml").read_text())
        assert {k: v for k, v in config.items() if k != "seed"} == {
            **{k: v for k, v in base.items() if k != "seed"}, **case.overrides}
    assert grid.seeds == (1, 2, 3)
    assert len(cells(grid)) == 30
