"""CLI: commands work, and bad input gets one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from backdoors.cli import main


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(capsys, code):
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_train_writes_a_complete_run_folder(tiny, tmp_path, capsys):
    tiny["train"]["epochs"] = 1
    tiny["train"]["tensorboard"] = True
    assert main(["train", str(write(tmp_path, tiny)), "--out", str(tmp_path), "--name", "r"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "completed: clean accuracy" in out
    run = tmp_path / "r"
    for name in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "attack.json",
                 "checkpoints/last.safetensors", "checkpoints/best.safetensors"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    for key in ("clean_accuracy", "asr", "backdoor_accuracy", "robust_accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["seconds_per_epoch"] > 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["synthesizer"]["label_mode"] == "all_to_one"  # defaults written out
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())


def test_tensorboard_has_original_tags(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny["train"].update(epochs=1, tensorboard=True, log_interval=4)
    tiny["attack"] = {"name": "blind"}
    assert main(["train", str(write(tmp_path, tiny)), "--out", str(tmp_path), "--name", "r",
                 "--quiet"]) == 0
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"Train/Loss_normal", "Train/Loss_backdoor", "Train/Scale_normal",
            "Train/Scale_backdoor", "Test/clean_accuracy", "Test/asr"} <= tags


def test_existing_run_folder_is_never_overwritten(tiny, tmp_path, capsys):
    tiny["train"]["epochs"] = 1
    cfg = str(write(tmp_path, tiny))
    assert main(["train", cfg, "--out", str(tmp_path), "--name", "r", "--quiet"]) == 0
    before = (tmp_path / "r" / "summary.json").read_text()
    err = one_line_error(capsys, main(["train", cfg, "--out", str(tmp_path), "--name", "r"]))
    assert "already exists" in err
    assert (tmp_path / "r" / "summary.json").read_text() == before


def test_default_run_names_are_unique(tiny, tmp_path):
    tiny["train"]["epochs"] = 1
    cfg = str(write(tmp_path, tiny))
    for _ in range(2):
        assert main(["train", cfg, "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=0.1", "did you mean 'lr'"),
    ("train.lr=fast", "train.lr"),
    ("synthesizer.name=patern", "did you mean 'pattern'"),
    ("attack={name: blind, balancer: {name: mgda, normalize: l3}}", "attack.balancer.normalize"),
    ("attack={name: batch, fractoin: 0.5}", "did you mean 'fraction'"),
    ("model.name=resnet81", "did you mean 'resnet18'"),
    ("trian.lr=0.1", "did you mean 'train'"),
    ("task.max_train_samples=0", "max_train_samples"),
])
def test_bad_overrides_name_the_key(override, needle, tiny, tmp_path, capsys):
    code = main(["train", str(write(tmp_path, tiny)), "--out", str(tmp_path), "--set", override])
    assert needle in one_line_error(capsys, code)
    assert not (tmp_path / "runs").exists()


def test_override_changes_the_run(tiny, tmp_path):
    cfg = str(write(tmp_path, tiny))
    assert main(["train", cfg, "--out", str(tmp_path), "--name", "r", "--quiet",
                 "--set", "train.epochs=1", "--set", "attack.name=batch"]) == 0
    resolved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 1 and resolved["attack"]["name"] == "batch"


def test_missing_config_file(capsys):
    assert "not found" in one_line_error(capsys, main(["train", "nope.yaml"]))


def test_unknown_command_and_bad_usage(capsys):
    one_line_error(capsys, main(["trian"]))
    one_line_error(capsys, main(["list", "widgets"]))


def test_validate_reports_ok_and_errors(tiny, tmp_path, capsys):
    good = write(tmp_path, tiny, "good.yaml")
    assert main(["validate", str(good)]) == 0
    assert "ok:" in capsys.readouterr().out
    tiny["attack"] = {"name": "blind", "loss_terms": ["normal", "backdor"]}
    bad = write(tmp_path, tiny, "bad.yaml")
    err = one_line_error(capsys, main(["validate", str(good), str(bad)]))
    assert "bad.yaml" in err and "did you mean 'backdoor'" in err


@pytest.mark.parametrize("what", ["tasks", "models", "synthesizers", "attacks", "balancers",
                                  "loss_terms"])
def test_list_prints_names_with_descriptions(what, capsys):
    assert main(["list", what]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all(len(line.split(None, 1)) == 2 for line in lines), lines


def test_show_prints_summary(tiny, tmp_path, capsys):
    tiny["train"]["epochs"] = 1
    main(["train", str(write(tmp_path, tiny)), "--out", str(tmp_path), "--name", "r", "--quiet"])
    capsys.readouterr()
    assert main(["show", "--json", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    assert main(["show", str(tmp_path / "r")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "status", "epochs"] and "completed" in table[1]
    one_line_error(capsys, main(["show", str(tmp_path / "missing")]))


def test_module_entry_point_exit_code():
    proc = subprocess.run([sys.executable, "-m", "backdoors", "train", "missing.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_gallery_draws_a_png(tiny, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert main(["gallery", str(write(tmp_path, tiny)), "--out", str(out), "--n", "4"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(capsys, main(["gallery", str(write(tmp_path, tiny)), "--out", "x.jpg"]))


def test_output_cut_short_by_a_pipe_ends_quietly():
    """`backdoors list ... | head -1`: the reader leaves early; no error line, exit 0."""
    shell = f"{sys.executable} -m backdoors list defenses strip | head -1"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "defense 'strip'"
    assert done.stderr == ""
