"""Resume: an interrupted run (Ctrl-C, SIGTERM, even SIGKILL) continues to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from support import StopAfter

from backdoors.cli import main
from backdoors.config import from_dict
from backdoors.experiment import Interrupted, resume, run
from backdoors.runs import RunFolder, load_weights

EPOCHS = 4


@pytest.fixture
def config(tiny):
    tiny["train"].update(epochs=EPOCHS, scheduler="cosine", tensorboard=True)
    tiny["synthesizer"]["dynamic"] = True
    tiny["attack"] = {"name": "blind", "alternating": 0.7}
    return tiny


def epoch_rows(path: Path) -> list[dict]:
    return [r for r in RunFolder(path).rows() if r["kind"] == "epoch"]


def same_metrics(a: list[dict], b: list[dict]) -> bool:
    keys = ("epoch", "clean_accuracy", "clean_loss", "asr", "backdoor_loss", "train_loss", "lr")
    return [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]




def test_interrupted_then_resumed_equals_uninterrupted(config, tmp_path):
    full = run(from_dict(config), out=tmp_path, name="full", quiet=True)
    with pytest.raises(Interrupted):
        run(from_dict(config), out=tmp_path, name="part", hooks=[StopAfter(2)], quiet=True)
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["status"] == "interrupted"
    resumed = resume(tmp_path / "part", quiet=True)
    assert resumed["status"] == "completed"
    assert same_metrics(epoch_rows(tmp_path / "full"), epoch_rows(tmp_path / "part"))
    assert resumed["clean_loss"] == full["clean_loss"] and resumed["asr"] == full["asr"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_exact_in_mixed_precision(config, tmp_path, precision):
    """bf16 autocast, and fp16 with its loss scaler checkpointed, resume bit for bit.
    fp16 kernels are slow on a CPU, so its run is cut to a few batches per epoch."""
    config["train"]["precision"] = precision
    if precision == "fp16":
        config["train"]["max_batches"] = 2
    full = run(from_dict(config), out=tmp_path, name="full", quiet=True)
    with pytest.raises(Interrupted):
        run(from_dict(config), out=tmp_path, name="part", hooks=[StopAfter(2)], quiet=True)
    resumed = resume(tmp_path / "part", quiet=True)
    assert same_metrics(epoch_rows(tmp_path / "full"), epoch_rows(tmp_path / "part"))
    assert resumed["clean_loss"] == full["clean_loss"] and resumed["asr"] == full["asr"]
    full_w = load_weights(tmp_path / "full" / "checkpoints" / "last.safetensors")
    part_w = load_weights(tmp_path / "part" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(full_w[k], part_w[k]) for k in full_w)


def test_completed_run_cannot_be_resumed(config, tmp_path):
    config["train"]["epochs"] = 1
    run(from_dict(config), out=tmp_path, name="done", quiet=True)
    assert main(["train", "--resume", str(tmp_path / "done")]) == 2


def _start(cfg_path: Path, out: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "backdoors", "train", str(cfg_path), "--out", str(out),
         "--name", name, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_epoch(path: Path, epoch: int, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.time() + limit
    while time.time() < deadline:
        if (path / "metrics.jsonl").exists() and any(
            r["epoch"] >= epoch for r in epoch_rows(path)
        ):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the epoch in time")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_process_resumes_to_the_same_result(sig, config, tmp_path):
    config["train"]["epochs"] = 6
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    assert main(["train", str(cfg_path), "--out", str(tmp_path), "--name", "full",
                 "--quiet"]) == 0
    proc = _start(cfg_path, tmp_path, "killed")
    _wait_for_epoch(tmp_path / "killed", 2, proc)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, err
        summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
        assert summary["status"] == "interrupted"
        assert "--resume" in err
    assert main(["train", "--resume", str(tmp_path / "killed"), "--quiet"]) == 0
    assert same_metrics(epoch_rows(tmp_path / "full"), epoch_rows(tmp_path / "killed"))
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["status"] == "completed"
