"""Bad input, table-driven: every case ends in one line on stderr (what, where, what was
expected), the documented exit code, no traceback, and no half-made run folder."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from backdoors.cli import main
from backdoors.config import from_dict
from backdoors.experiment import run

pytestmark = pytest.mark.usefixtures("one_thread")

BASE: dict[str, Any] = {
    "name": "bad", "seed": 0, "task": {"name": "synthetic", "train_size": 128,
                                       "test_size": 64},
    "train": {"epochs": 1, "lr": 0.05, "tensorboard": False, "progress": False},
    "synthesizer": {"name": "pattern", "target": 1}, "attack": {"name": "data"},
}
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads files chmod 000


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    run(from_dict(copy.deepcopy(BASE)), out=out, name="done", quiet=True)
    return out / "done"


class Case:
    """argv built in a fresh folder; `code` and a `needle` the one line must contain."""

    def __init__(self, argv: Callable[[Path, Path], list[str]], code: int, needle: str) -> None:
        self.argv, self.code, self.needle = argv, code, needle


def cfg(tmp: Path, change: Callable[[dict[str, Any]], Any] | None = None,
        text: str | None = None, raw: bytes | None = None) -> str:
    """Write a config (BASE changed by `change`, or literal text/bytes); return its path."""
    path = tmp / "cfg.yaml"
    if raw is not None:
        path.write_bytes(raw)
    elif text is not None:
        path.write_text(text)
    else:
        data = copy.deepcopy(BASE)
        if change is not None:
            change(data)
        path.write_text(yaml.safe_dump(data))
    return str(path)


def train(tmp: Path, change: Callable[[dict[str, Any]], Any] | None = None,
          flags: tuple[str, ...] = (), **kw: Any) -> list[str]:
    return ["train", cfg(tmp, change, **kw), "--out", str(tmp / "runs"), *flags]


def put(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.setdefault(section, {}).update(values)


def damaged(name: str, how: str = "truncate") -> Callable[[Path, Path], list[str]]:
    """`train --resume` on a copy of a finished run, marked interrupted, with `name`
    damaged."""
    def argv(tmp: Path, done: Path) -> list[str]:
        folder = tmp / "copy"
        shutil.copytree(done, folder)
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
        target = folder / name
        if how == "truncate":
            target.write_bytes(target.read_bytes()[:40])
        elif how == "first byte":
            target.write_bytes(b"X" + target.read_bytes()[1:])
        else:
            target.write_text(target.read_text() + how)
        return ["train", "--resume", str(folder)]
    return argv


def defend_copy(change: Callable[[Path], Any], *extra: str) -> Callable[[Path, Path], list[str]]:
    def argv(tmp: Path, done: Path) -> list[str]:
        folder = tmp / "copy"
        shutil.copytree(done, folder)
        change(folder)
        return ["defend", str(folder), "--defense", "strip", *extra]
    return argv


def legacy(text: str) -> Callable[[Path, Path], list[str]]:
    return lambda t, d: train(t, text="task: MNIST\n" + text)


CASES: dict[str, Case] = {
    # config files
    "missing config": Case(lambda t, d: ["train", str(t / "nope.yaml")], 2, "not found"),
    "config is a folder": Case(lambda t, d: ["train", str(t)], 2, "is a folder"),
    "config not UTF-8": Case(lambda t, d: train(t, raw=b"name: caf\xe9\n"), 2, "not UTF-8"),
    "YAML syntax": Case(lambda t, d: train(t, text="task: {name: digits\n"), 2, "not valid YAML"),
    "YAML list": Case(lambda t, d: train(t, text="- a\n- b\n"), 2, "mapping of sections"),
    "unknown section": Case(lambda t, d: train(t, lambda c: c.update(trian={})), 2,
                            "did you mean 'train'"),
    "missing task": Case(lambda t, d: train(t, lambda c: c.pop("task")), 2, "missing section"),
    "name with a slash": Case(lambda t, d: train(t, lambda c: c.update(name="a/b")), 2,
                              "plain folder name"),
    "absolute name": Case(lambda t, d: train(t, lambda c: c.update(name="/abs")), 2,
                          "plain folder name"),
    "negative seed": Case(lambda t, d: train(t, lambda c: c.update(seed=-1)), 2, "seed"),
    "seed 2^63": Case(lambda t, d: train(t, lambda c: c.update(seed=2**63)), 2, "seed"),
    "float seed": Case(lambda t, d: train(t, lambda c: c.update(seed=1.5)), 2, "seed"),
    "negative lr": Case(lambda t, d: train(t, put("train", lr=-1.0)), 2, "train.lr"),
    "lr nan": Case(lambda t, d: train(t, text=yaml.safe_dump(BASE).replace(
        "lr: 0.05", "lr: .nan")), 2, "finite"),
    "lr a word": Case(lambda t, d: train(t, put("train", lr="fast")), 2, "train.lr"),
    "negative momentum": Case(lambda t, d: train(t, put("train", momentum=-0.9)), 2,
                              "train.momentum"),
    "negative weight decay": Case(lambda t, d: train(t, put("train", weight_decay=-1e-4)), 2,
                                  "train.weight_decay"),
    "zero epochs": Case(lambda t, d: train(t, put("train", epochs=0)), 2, "train.epochs"),
    "device gpu": Case(lambda t, d: train(t, put("train", device="gpu")), 2, "train.device"),
    "device cuda:7": Case(lambda t, d: train(t, put("train", device="cuda:7")), 2,
                          "train.device"),
    "pretrained missing": Case(lambda t, d: train(t, put("train", pretrained="no.pt")), 2,
                               "not found"),
    "resume_model missing": Case(lambda t, d: train(t, put("train", resume_model="no.pt")), 2,
                                 "not found"),
    "multistep without milestones": Case(
        lambda t, d: train(t, put("train", scheduler="multistep")), 2, "milestones"),
    "unknown task": Case(lambda t, d: train(t, lambda c: c.update(task="synthetc")), 2,
                         "did you mean 'synthetic'"),
    "unknown synthesizer key": Case(lambda t, d: train(t, put("synthesizer", trget=1)), 2,
                                    "did you mean 'target'"),
    "target not a class": Case(lambda t, d: train(t, put("synthesizer", target=9)), 2,
                               "not a class"),
    "attack option type": Case(lambda t, d: train(t, put("attack", ratio="half")), 2,
                               "attack.ratio"),
    "defenses not a list": Case(lambda t, d: train(t, lambda c: c.update(defenses="strip")), 2,
                                "must be a list"),
    "unknown defense": Case(lambda t, d: train(t, lambda c: c.update(defenses=["stirp"])), 2,
                            "did you mean 'strip'"),
    "clean label all-to-all": Case(lambda t, d: train(t, lambda c: (
        c["attack"].update(clean_label=True), c["synthesizer"].update(label_mode="all_to_all"))),
        2, "single backdoor target"),
    "federated dataset defense": Case(lambda t, d: train(t, lambda c: c.update(
        federated={"participants": 4, "per_round": 2}, defenses=["spectral_signatures"])), 2,
        "central training set"),
    "federated per_round": Case(lambda t, d: train(t, lambda c: c.update(
        federated={"participants": 2, "per_round": 4})), 2, "federated.per_round"),
    "federated aggregator": Case(lambda t, d: train(t, lambda c: c.update(
        federated={"aggregator": "krumm"})), 2, "did you mean 'krum'"),
    "federated scheduler": Case(lambda t, d: train(t, lambda c: (
        c.update(federated={}), c["train"].update(scheduler="cosine"))), 2, "train.scheduler"),
    # overrides
    "--set without =": Case(lambda t, d: train(t, flags=("--set", "train.lr")), 2, "key=value"),
    "--set empty key part": Case(lambda t, d: train(t, flags=("--set", "train..lr=1")), 2,
                                 "bad key"),
    "--set into a value": Case(lambda t, d: train(t, flags=("--set", "seed.x=1")), 2,
                               "not a section"),
    "--name escapes": Case(lambda t, d: train(t, flags=("--name", "../x")), 2, "plain folder name"),
    # legacy Backdoors 101 files
    "legacy label a word": Case(legacy("lr: 0.1\nbackdoor_label: abc\n"), 2, "backdoor_label"),
    "legacy epochs a word": Case(legacy("lr: 0.1\nepochs: ten\n"), 2, "legacy key 'epochs'"),
    "legacy scales a list": Case(legacy("lr: 0.1\nloss_balance: fixed\nfixed_scales: [1]\n"),
                                 2, "fixed_scales"),
    "legacy unknown key": Case(legacy("lr: 0.1\nlearning_rate: 0.1\n"), 2, "unknown legacy key"),
    "legacy task": Case(lambda t, d: train(t, text="task: SVHN\nlr: 0.1\n"), 2,
                        "unsupported value"),
    # run folders
    "--out is a file": Case(lambda t, d: ["train", cfg(t), "--out", cfg(t)], 2, "--out"),
    "resume missing": Case(lambda t, d: ["train", "--resume", str(t / "none")], 2, "not found"),
    "resume a non-run": Case(lambda t, d: ["train", "--resume", str(t)], 2, "not a run folder"),
    "resume completed": Case(lambda t, d: ["train", "--resume", str(d)], 2, "already completed"),
    "resume with a config": Case(lambda t, d: ["train", cfg(t), "--resume", str(d)], 2,
                                 "--resume takes no config"),
    "resume truncated commit": Case(damaged("checkpoints/commit.pt"), 2, "damaged"),
    "resume garbage log line": Case(damaged("metrics.jsonl", "first byte"), 2, "not valid JSON"),
    "resume edited config": Case(damaged("config.yaml", "seed: 5\n"), 2, "changed since"),
    "show missing": Case(lambda t, d: ["show", str(t / "none")], 2, "not found"),
    "show damaged summary": Case(defend_copy(
        lambda f: (f / "summary.json").write_text("{oops")), 2, "damaged"),
    "defend a non-run": Case(lambda t, d: ["defend", str(t), "--defense", "strip"], 2,
                             "not a run folder"),
    "defend unknown defense": Case(lambda t, d: ["defend", str(d), "--defense", "stirp"], 2,
                                   "did you mean 'strip'"),
    "defend bad option": Case(lambda t, d: ["defend", str(d), "--defense", "strip", "--set",
                                            "m=3"], 2, "unknown key 'm'"),
    "defend unknown run key": Case(lambda t, d: ["defend", str(d), "--defense", "strip",
                                                 "--set", "a.b=3"], 2, "unknown section 'a'"),
    "defend changes the run": Case(lambda t, d: ["defend", str(d), "--defense", "strip",
                                                 "--set", "train.lr=0.9"], 2, "would change"),
    "defend on nothing": Case(lambda t, d: ["defend", str(d), "--defense", "strip", "--on",
                                            "fine_pruning"], 2, "no model made"),
    "defend truncated weights": Case(defend_copy(lambda f: (
        f / "checkpoints/last.safetensors").write_bytes(b"\x00" * 10)), 2, "not a readable"),
    "defend unfinished run": Case(defend_copy(lambda f: (f / "summary.json").write_text(
        json.dumps({"status": "interrupted"}))), 2, "did not complete"),
    "defend missing weights": Case(defend_copy(
        lambda f: (f / "checkpoints/last.safetensors").unlink()), 2, "not found"),
    # other commands
    "gallery --n 0": Case(lambda t, d: ["gallery", cfg(t), "--out", str(t / "g.png"), "--n",
                                        "0"], 2, "--n"),
    "list unknown": Case(lambda t, d: ["list", "widgets"], 2, "invalid choice"),
    "crashtest --units": Case(lambda t, d: ["crashtest", cfg(t), "--units", "-1"], 2,
                              "--units"),
    "no command": Case(lambda t, d: [], 2, "required"),
    "data_dir missing": Case(lambda t, d: train(t, lambda c: c.update(
        task={"name": "mnist", "data_dir": str(t / "no-mnist")})), 2, "no-mnist"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line(name, tmp_path, finished, capsys):
    case = CASES[name]
    argv = case.argv(tmp_path, finished)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == case.code, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and case.needle in err, err
    runs = tmp_path / "runs"
    assert not runs.exists() or not [p for p in runs.iterdir()], "half-made run folder"


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their mode")
def test_unreadable_config_is_one_line(tmp_path, capsys):
    path = Path(cfg(tmp_path))
    path.chmod(0)
    assert main(["train", str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_full_disk_at_a_checkpoint_fails_the_run_and_keeps_the_last_commit(
        tmp_path, monkeypatch, capsys):
    import backdoors.runs.commit as commit
    from backdoors.errors import RunError

    real = commit.write_atomic

    def full(path: Path, write: Any) -> None:  # what write_atomic raises on ENOSPC
        if (path.parent / "commit.pt").exists():
            raise RunError(f"cannot write {path}: No space left on device")
        real(path, write)

    data = copy.deepcopy(BASE)
    data["train"]["epochs"] = 2
    monkeypatch.setattr(commit, "write_atomic", full)
    code = main(["train", cfg(tmp_path, lambda c: c.update(data)), "--out", str(tmp_path),
                 "--name", "full", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No space left" in err, err
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    monkeypatch.setattr(commit, "write_atomic", real)
    assert main(["train", "--resume", str(tmp_path / "full"), "--quiet"]) == 0


def test_a_write_that_fails_midway_keeps_the_old_file_whole(tmp_path):
    import errno

    from backdoors.errors import RunError
    from backdoors.runs.files import write_atomic, write_text

    path = tmp_path / "summary.json"
    write_text(path, "old")

    def half(f: Any) -> None:
        f.write(b"ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunError, match="No space left on device"):
        write_atomic(path, half)
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
