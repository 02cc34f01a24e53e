"""What a new user meets in the first hour: run folders that work from anywhere and follow
moved data, defenses that show progress, keep their results, save their models and
chain, components that describe themselves, and the Backdoors 101 files that used to fail."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from backdoors.cli import main
from backdoors.config import from_dict
from backdoors.experiment import run

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def attacked(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished data-poisoning run whose data lives in a file-backed MNIST-layout folder
    given by a relative path (as configs do)."""
    from backdoors.data import TASKS
    from backdoors.data.mnist import write_idx

    monkeypatch.chdir(tmp_path)
    synthetic = TASKS.build("synthetic", {"train_size": 256, "test_size": 128}, "task")
    for split, ds in (("train", synthetic.train), ("t10k", synthetic.test)):
        big = np.zeros((len(ds), 28, 28), dtype=np.uint8)
        big[:, 6:22, 6:22] = ds.images[:, 0].numpy()
        write_idx(Path("data") / f"{split}-images-idx3-ubyte.gz", big)
        labels = ds.labels.numpy().astype(np.uint8)
        write_idx(Path("data") / f"{split}-labels-idx1-ubyte.gz", labels)
    tiny.update(task={"name": "mnist", "data_dir": "data"}, model={"name": "tiny_cnn"},
                attack={"name": "data", "ratio": 0.1})
    tiny["train"].update(epochs=2, batch_size=32)
    run(from_dict(tiny), out="runs", name="r", quiet=True)
    return tmp_path / "runs" / "r"


def test_run_folders_store_absolute_data_paths_and_work_from_anywhere(
        attacked, tmp_path, monkeypatch, capsys):
    saved = yaml.safe_load((attacked / "config.yaml").read_text())
    assert Path(saved["task"]["data_dir"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["defend", str(attacked), "--defense", "strip", "--set", "n=4"]) == 0
    assert main(["show", str(attacked)]) == 0
    assert "completed" in capsys.readouterr().out


def test_defend_follows_moved_data_and_refuses_a_changed_experiment(attacked, tmp_path, capsys):
    shutil.move(tmp_path / "data", tmp_path / "moved")
    assert main(["defend", str(attacked), "--defense", "strip", "--set", "n=4"]) == 2
    assert "MNIST" in one_line(capsys)
    assert main(["defend", str(attacked), "--defense", "strip", "--set", "n=4", "--set",
                 f"task.data_dir={tmp_path / 'moved'}"]) == 0
    saved = yaml.safe_load((attacked / "config.yaml").read_text())
    assert saved["task"]["data_dir"] == str(tmp_path / "moved")  # remembered
    capsys.readouterr()
    assert main(["defend", str(attacked), "--defense", "fine_tuning", "--set",
                 "train.lr=0.5"]) == 2
    assert "would change what" in one_line(capsys)


def test_defenses_keep_results_save_models_and_chain(attacked, capsys):
    assert main(["defend", str(attacked), "--defense", "fine_pruning", "--set", "epochs=2"]) == 0
    pruned = json.loads(next((attacked / "defenses").glob("fine_pruning-*/result.json"))
                        .read_text())
    key = next((attacked / "defenses").glob("fine_pruning-*")).name
    assert (attacked / "defenses" / key / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["defend", str(attacked), "--defense", "fine_pruning", "--set", "epochs=2"]) == 2
    assert "--replace" in one_line(capsys)
    assert main(["defend", str(attacked), "--defense", "strip", "--set", "n=4",
                 "--on", key]) == 0
    chained = json.loads((attacked / "defenses" / f"{key}+strip-"
                          f"{_hash({'n': 4})}" / "result.json").read_text())
    assert chained["on"] == key
    # The chained defense saw the pruned model: its "before" is fine-pruning's "after".
    assert chained["before"]["asr"] == pytest.approx(pruned["after"]["asr"])
    assert main(["defend", str(attacked), "--defense", "strip", "--on", "nothing"]) == 2
    assert "no model made by that defense" in one_line(capsys)


def _hash(options: dict[str, Any]) -> str:
    from backdoors.assembly.defending import defense_key
    from backdoors.config import Component

    return defense_key(Component("x", options)).split("-", 1)[1]


def test_defenses_show_progress_on_a_terminal(attacked, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["defend", str(attacked), "--defense", "neural_cleanse", "--set", "steps=3",
                 "--set", "epochs=1"]) == 0
    captured = capsys.readouterr()
    assert "neural_cleanse: reversing the trigger of each class" in captured.err
    assert "neural_cleanse (inspection)" in captured.out  # the one-line result


def test_a_run_killed_during_its_defenses_finishes_them_on_resume(tiny, tmp_path):
    tiny["train"]["epochs"] = 1
    tiny["defenses"] = ["strip"]
    run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    shutil.rmtree(tmp_path / "r" / "defenses")  # as if killed before the defense finished
    assert main(["train", "--resume", str(tmp_path / "r"), "--quiet"]) == 0
    assert (tmp_path / "r" / "defenses" / "strip" / "result.json").is_file()
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2  # now nothing is left


def test_list_describes_a_component(capsys):
    assert main(["list", "defenses", "neural_cleanse"]) == 0
    out = capsys.readouterr().out
    assert "Neural Cleanse" in out and "steps" in out and "300" in out
    assert main(["list", "synthesizers", "patern"]) == 2
    assert "did you mean 'pattern'" in one_line(capsys)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("backdoors ")


def test_gallery_of_a_trained_run_draws_its_predictions(attacked, tmp_path, capsys):
    out = tmp_path / "pred.png"
    assert main(["gallery", str(attacked), "--out", str(out), "--n", "4"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- Backdoors 101 files -----------------------------------------------------------------


def test_legacy_errors_name_the_key_the_user_wrote(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("task: MNIST\nlr: 0.01\nbackdoor_label: 12\n")
    assert main(["validate", str(path)]) == 2
    assert "legacy key 'backdoor_label'" in one_line(capsys)
    from backdoors.legacy import main as legacy_main

    assert legacy_main(["--name", "x", "--params", str(path), "--set", "epochs=1"]) == 2
    assert "did you mean 'train.epochs'" in one_line(capsys)


def test_legacy_physical_synthesizer_is_the_physical_trigger():
    from backdoors.config.compat import convert_legacy

    native = convert_legacy({"task": "MNIST", "lr": 0.1, "synthesizer": "Physical"})
    assert native["synthesizer"]["name"] == "physical"
    assert native["synthesizer"]["scale"] == [0.3, 0.5]


@pytest.mark.slow
@pytest.mark.real_data
def test_the_original_mnist_params_with_physical_learn_the_backdoor(shared_data, tmp_path,
                                                                    monkeypatch, capsys):
    """configs/mnist_params.yaml with `synthesizer: Physical`, 2 epochs on the split."""
    from backdoors.legacy import main as legacy_main

    repo = Path(__file__).resolve().parents[1]
    params = (repo / "configs/mnist_params.yaml").read_text().replace(
        "synthesizer: Pattern", "synthesizer: Physical").replace("epochs: 350", "epochs: 2")
    (tmp_path / "params.yaml").write_text(params.replace("save_model: True", "save_model: False"))
    monkeypatch.chdir(tmp_path)
    # As its header says: the split made by `backdoors data mnist-split` is found from the
    # original's data_path .data/.
    assert main(["data", "mnist-split", "--from", str(shared_data / "mnist-t10k")]) == 0
    assert legacy_main(["--name", "physical", "--params", "params.yaml"]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if "Epoch: 2." in line]
    assert float(last[1].split("Top-1: ")[1].split(" ")[0]) >= 90.0, last


def test_protocol_2_cifar_pickles_load_and_code_is_still_refused(tmp_path):
    from backdoors.data.cifar_batches import _read_pickle_batch
    from backdoors.errors import DataError

    batch = tmp_path / "data_batch_1"
    data = {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [1, 2]}
    batch.write_bytes(pickle.dumps(data, protocol=2))  # bytes become _codecs.encode(...)
    assert _read_pickle_batch(batch)[1].tolist() == [1, 2]

    class Evil:
        def __reduce__(self) -> Any:
            import os

            return (os.system, ("echo hacked",))

    batch.write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load global"):
        _read_pickle_batch(batch)


def _cifar_batches(folder: Path) -> None:
    """The six CIFAR-10 python batches, re-pickled by Python 3 with protocol 2 (16 images
    each), as people do to make subsets."""
    from backdoors.data.cifar_batches import PICKLE_FILES

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in PICKLE_FILES:
        batch = {b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 16).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _cifar_folder(root: Path) -> None:
    from PIL import Image

    from backdoors.data.cifar import CLASS_NAMES

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in CLASS_NAMES:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@pytest.mark.parametrize("layout", ["pickles", "folder"])
def test_the_original_cifar10_params_run_on_pickles_and_on_an_image_folder(
        layout, tmp_path, monkeypatch, capsys):
    from backdoors.legacy import main as legacy_main

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    if layout == "pickles":
        _cifar_batches(data / "cifar-10-batches-py")
    else:
        _cifar_folder(data / "cifar10-jpg")
    monkeypatch.chdir(tmp_path)  # saved_models/ and runs/ are written where it starts
    code = legacy_main(["--name", "c", "--params", str(repo / "configs/cifar10_params.yaml"),
                        "--set", f"task.data_dir={data}", "--set", "train.epochs=1",
                        "--set", "train.max_batches=1",
                        "--set", "model={name: resnet18, width: 8}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Backdoor False. Epoch: 1." in out.out
