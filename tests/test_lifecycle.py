"""The run lifecycle: crash safety (a kill after every file written, and at random
instants), the writer lock, divergence, failed runs, tampered folders, index spaces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from backdoors.assembly.artifact import reopen
from backdoors.assembly.defending import defend
from backdoors.cli import main
from backdoors.config import from_dict
from backdoors.defenses.runner import clean_budget
from backdoors.errors import RunError
from backdoors.experiment import resume, run
from backdoors.runs import RunFolder, RunLock

pytestmark = pytest.mark.usefixtures("one_thread")


def write(tmp_path: Path, data: dict[str, Any], name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def crashtest(cfg: Path, out: Path, units: int, instants: int) -> tuple[int, str]:
    """`backdoors crashtest` in a fresh process (it forks, so it must own its process)."""
    proc = subprocess.run([sys.executable, "-m", "backdoors", "crashtest", str(cfg), "--out",
                           str(out), "--units", str(units), "--instants", str(instants)],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


# -- crash safety ----------------------------------------------------------------------


def small(tiny: dict[str, Any]) -> dict[str, Any]:
    """A run of a few cheap steps: kills land after every kind of write all the same."""
    tiny["task"] = {"name": "synthetic", "train_size": 192, "test_size": 64}
    tiny["train"].update(batch_size=32, log_interval=3)
    return tiny


def test_a_kill_after_any_write_or_at_any_instant_resumes_to_the_same_run(tiny, tmp_path):
    small(tiny)["train"].update(epochs=2, scheduler="cosine")
    tiny["synthesizer"]["dynamic"] = True
    tiny["attack"] = {"name": "blind", "alternating": 0.7}  # attack state to checkpoint
    code, out = crashtest(write(tmp_path, tiny), tmp_path / "ct", units=1, instants=2)
    assert code == 0, out
    kills = [line for line in out.splitlines() if line.startswith(("held", "BROKEN"))]
    kinds = {line.split("(")[-1].rstrip(")") for line in kills if "after write" in line}
    assert {"config.yaml", "env.json", "attack.json", "checkpoints/commit.pt",
            "metrics.jsonl", "checkpoints/last.safetensors", "summary.json"} <= kinds, out
    assert len(kills) >= 14 and all(line.startswith("held") for line in kills), out


def test_a_killed_federated_run_resumes_to_the_same_rounds(tiny, tmp_path):
    small(tiny)["attack"] = {"name": "data", "ratio": 0.5}
    tiny["federated"] = {"rounds": 2, "participants": 4, "per_round": 2, "local_epochs": 1,
                         "adversaries": 1, "weight_scale": 2.0,
                         "aggregator": {"name": "foolsgold"}}  # state across rounds
    code, out = crashtest(write(tmp_path, tiny), tmp_path / "ct", units=1, instants=1)
    assert code == 0 and "BROKEN" not in out, out


def test_crashtest_sees_a_resume_that_drifts(tmp_path):
    from backdoors.crashtest import same_run

    a, b = tmp_path / "a", tmp_path / "b"
    for path, acc in ((a, 0.5), (b, 0.6)):
        (path / "checkpoints").mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps({"status": "completed"}))
        (path / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1,
                                                        "clean_accuracy": acc}) + "\n")
    held, detail = same_run(a, b)
    assert not held and "row 1" in detail


# -- the lock --------------------------------------------------------------------------


def test_a_busy_run_folder_refuses_a_second_writer(tiny, tmp_path, capsys):
    tiny["train"]["epochs"] = 1
    run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    folder = tmp_path / "r"
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    with RunLock(folder, "training"):
        assert main(["train", "--resume", str(folder)]) == 2
        assert "in use" in one_line(capsys)
        assert main(["defend", str(folder), "--defense", "strip"]) == 2
        assert "in use" in one_line(capsys)
    assert main(["train", "--resume", str(folder), "--quiet"]) == 0  # free again


def test_show_tells_a_killed_run_from_a_running_one(tiny, tmp_path, capsys):
    tiny["train"]["epochs"] = 1
    run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    folder = tmp_path / "r"
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    assert main(["show", "--json", str(folder)]) == 0
    assert "no process is running" in capsys.readouterr().err
    assert main(["show", str(folder)]) == 0
    assert "killed (resume it)" in capsys.readouterr().out
    with RunLock(folder, "training"):
        assert main(["show", "--json", str(folder)]) == 0
        assert "no process" not in capsys.readouterr().err


# -- divergence and failed runs ----------------------------------------------------------


def test_a_diverging_run_stops_at_once_and_fails(tiny, tmp_path, capsys):
    cfg = write(tmp_path, tiny)
    code = main(["train", str(cfg), "--out", str(tmp_path), "--name", "nan", "--quiet",
                 "--set", "train.lr=1.0e+12"])
    assert code == 1
    err = one_line(capsys)
    assert "diverged" in err and "epoch 1, step" in err and "train.lr" in err
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["error"]
    assert not [r for r in RunFolder(tmp_path / "nan").rows() if r["kind"] == "epoch"]
    assert main(["show", str(tmp_path / "nan")]) == 0


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused_before_anything_runs(value, tiny, tmp_path, capsys):
    cfg = write(tmp_path, tiny)
    assert main(["validate", str(cfg), "--set", f"train.lr={value}"]) == 2
    assert "finite" in one_line(capsys)
    assert main(["train", str(cfg), "--out", str(tmp_path / "o"),
                 "--set", f"synthesizer.alpha={value}", "--set", "synthesizer.name=blend"]) == 2
    assert "finite" in one_line(capsys) and not (tmp_path / "o").exists()


def test_non_finite_pretrained_weights_are_refused(tiny, tmp_path, capsys):
    tiny["train"]["epochs"] = 1
    run(from_dict(tiny), out=tmp_path, name="src", quiet=True)
    weights = RunFolder(tmp_path / "src").checkpoints / "last.safetensors"
    from safetensors.torch import load_file

    state = load_file(weights)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first][0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    assert main(["train", str(write(tmp_path, tiny)), "--out", str(tmp_path / "o"),
                 "--set", f"train.pretrained={bad}"]) == 2
    assert "nan or inf" in one_line(capsys)
    assert not [p for p in (tmp_path / "o").glob("*") if not p.name.startswith(".")]


def test_a_failed_run_can_be_shown_and_resumed(tiny, tmp_path, capsys):
    tiny["train"]["epochs"] = 2
    run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    reference = [r for r in RunFolder(tmp_path / "r").rows() if r["kind"] == "epoch"]
    folder = tmp_path / "f"

    class Boom:  # a failure in the middle of epoch 2, after epoch 1's commit
        def on_start(self, *a: Any) -> None: ...
        def on_train_log(self, *a: Any) -> None: ...
        def on_scalars(self, *a: Any) -> None: ...
        def on_end(self) -> None: ...

        def on_epoch_end(self, epoch: int, *a: Any) -> None:
            if epoch == 1:
                raise OSError("simulated disk failure")

    with pytest.raises(OSError):
        run(from_dict(tiny), out=tmp_path, name="f", hooks=[Boom()], quiet=True)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and "simulated disk failure" in summary["error"]
    assert main(["show", str(folder)]) == 0
    capsys.readouterr()
    assert resume(folder, quiet=True)["status"] == "completed"
    rows = [r for r in RunFolder(folder).rows() if r["kind"] == "epoch"]
    keys = ("epoch", "clean_accuracy", "clean_loss", "asr", "train_loss")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys}
                                                       for r in reference]


# -- tampering ------------------------------------------------------------------------


@pytest.fixture
def finished(tiny: dict[str, Any], tmp_path: Path) -> Path:
    tiny["train"]["epochs"] = 1
    tiny["attack"] = {"name": "data", "ratio": 0.1}
    run(from_dict(tiny), out=tmp_path, name="done", quiet=True)
    return tmp_path / "done"


def test_defend_refuses_a_config_changed_after_training(finished, capsys):
    path = finished / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["synthesizer"]["target"] = 2
    path.write_text(yaml.safe_dump(data))
    assert main(["defend", str(finished), "--defense", "strip"]) == 2
    assert "changed since the run was trained" in one_line(capsys)


def test_moving_the_data_or_device_keeps_the_fingerprint(finished):
    path = finished / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["train"].update(device="cpu", progress=False, test_batch_size=64)
    path.write_text(yaml.safe_dump(data))
    assert defend(finished, "strip", {"n": 4})["auroc"] >= 0.0


def test_defend_refuses_weights_of_another_shape(finished, capsys):
    weights = finished / "checkpoints" / "last.safetensors"
    save_file({"w": torch.zeros(3)}, str(weights))
    assert main(["defend", str(finished), "--defense", "strip"]) == 2
    assert "does not fit the model" in one_line(capsys)


@pytest.mark.parametrize("damage", ["metrics.jsonl", "summary.json", "checkpoints/commit.pt"])
def test_damaged_run_files_are_one_line_errors(damage, tiny, tmp_path, capsys):
    tiny["train"]["epochs"] = 2
    run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    folder = tmp_path / "r"
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    target = folder / damage
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    code = main(["train", "--resume", str(folder), "--quiet"])
    if damage == "summary.json":  # derived: re-made from the log and the commit
        assert code == 0
    else:
        assert code == 2 and "damaged" in one_line(capsys) or "shorter" in capsys.readouterr().err


# -- names, numbers, threads ----------------------------------------------------------------


@pytest.mark.parametrize("args", [["--name", "../escape"], ["--name", "/abs"],
                                  ["--name", ".hidden"], ["--set", "name=../x"],
                                  ["--set", "name=/tmp/x"]])
def test_run_names_stay_inside_out(args, tiny, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", str(write(tmp_path, tiny)), "--out", str(out), *args]) == 2
    assert "plain folder name" in one_line(capsys)
    assert not (tmp_path / "escape").exists() and not out.exists()


def test_yaml_1_2_numbers_in_files_overrides_and_legacy_files(tiny, tmp_path):
    from backdoors.config import load_config

    text = yaml.safe_dump(tiny).replace("lr: 0.05", "lr: 5e-2")
    assert "5e-2" in text
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert load_config(path).train.lr == 0.05
    assert load_config(path, ["train.lr=1e-3"]).train.lr == 0.001
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text("task: MNIST\nlr: 1e-2\ndecay: 5e-4\nepochs: 1\n")
    cfg = load_config(legacy)
    assert cfg.train.lr == 0.01 and cfg.train.weight_decay == 0.0005


def test_env_records_the_thread_count_and_resume_restores_it(tiny, tmp_path):
    tiny["train"]["epochs"] = 1
    run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    folder = RunFolder(tmp_path / "r")
    assert folder.threads() == torch.get_num_threads() == 1  # the one_thread fixture


# -- index spaces ------------------------------------------------------------------------


@pytest.mark.parametrize("synthesizer", [
    {"name": "semantic", "target": 1, "source_class": 2},
    {"name": "edge_case", "target": 1, "source_class": 2},
])
def test_the_clean_budget_holds_no_poisoned_and_no_trigger_row(synthesizer, tiny, tmp_path):
    tiny["synthesizer"] = synthesizer
    tiny["attack"] = {"name": "data", "ratio": 0.1}
    tiny["train"]["epochs"] = 1
    run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    target = reopen(RunFolder(tmp_path / "r"))
    assert int(target.poisoned.sum()) > 0 and len(target.clean_train) == len(target.poisoned)
    budget = clean_budget(target, 0.5)
    assert not bool((budget.labels == 2).any())  # the trigger's own class left the task
    poisoned_images = target.train.images[target.poisoned].flatten(1)
    same = (budget.images.flatten(1)[:, None] == poisoned_images[None]).all(-1)
    assert not bool(same.any())  # no poisoned row in the budget


def test_resume_of_a_completed_or_missing_run_is_one_line(tiny, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "not found" in one_line(capsys)
    with pytest.raises(RunError):
        resume(tmp_path)
