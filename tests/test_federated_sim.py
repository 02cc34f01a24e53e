"""Federated simulation end to end on the tiny synthetic task: a boosted attacker
replaces the FedAvg model, Krum stops it, weight scaling, rows, resume, legacy entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import StopAfter, fl, rows

from backdoors.cli import main as cli_main
from backdoors.config import from_dict
from backdoors.errors import ConfigError
from backdoors.experiment import Interrupted, resume, run
from backdoors.runs import RunFolder


def test_replacement_backdoors_fedavg_and_krum_stops_it(tiny, tmp_path):
    plain = run(from_dict(fl(tiny)), out=tmp_path, quiet=True)
    krum = run(from_dict(fl(tiny, "krum")), out=tmp_path, quiet=True)
    assert plain["status"] == "completed" and plain["attack_rounds"] == [2]
    assert plain["clean_accuracy"] > 0.3 and plain["asr"] >= 0.9
    assert krum["asr"] <= 0.2 and krum["clean_accuracy"] >= 0.9
    last = rows(krum)[-1]
    attacker = last["attackers"][0]
    i = last["participants"].index(attacker)
    assert last["flagged"][i] and last["coefficients"][i] == 0
    assert last["detection"]["recall"] == 1.0 and krum["detection"]["true_positives"] == 1
    assert last["update_norms"][i] > 2 * max(n for j, n in enumerate(last["update_norms"])
                                             if j != i)
    assert rows(plain)[-1]["detection"] is None  # the plain mean judges nobody


def test_defenses_run_on_the_final_global_model(tiny, tmp_path, capsys):
    """A federated run is a finished attack like any other: its `defenses:` section runs
    after the last round, and `backdoors defend` reopens the run folder later."""
    cfg = fl(tiny)
    cfg["defenses"] = ["strip"]
    summary = run(from_dict(cfg), out=tmp_path, quiet=True)
    assert summary["asr"] >= 0.9
    assert summary["defenses"]["strip"]["auroc"] > 0.55  # 0.70 when written
    code = cli_main(["defend", summary["run_dir"], "--defense", "fine_pruning"])
    repaired = RunFolder(Path(summary["run_dir"])).read_summary()["defenses"]["fine_pruning"]
    assert code == 0 and repaired["before"]["asr"] == pytest.approx(summary["asr"])
    assert repaired["after"]["asr"] < 0.2
    assert repaired["after"]["clean_accuracy"] > repaired["before"]["clean_accuracy"]
    capsys.readouterr()
    assert cli_main(["defend", summary["run_dir"], "--defense", "activation_clustering"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "federated" in err and "Traceback" not in err


def test_weight_scale_multiplies_only_the_attackers_update(tiny, tmp_path):
    def first_round(scale: float) -> dict[str, Any]:
        cfg = fl(tiny, rounds=1, attack_round=1, weight_scale=scale)
        return rows(run(from_dict(cfg), out=tmp_path, quiet=True))[0]

    one, four = first_round(1.0), first_round(4.0)
    assert one["participants"] == four["participants"]
    assert four["update_norms"][0] == pytest.approx(4 * one["update_norms"][0], rel=1e-5)
    assert four["update_norms"][1:] == pytest.approx(one["update_norms"][1:], rel=1e-5)


def test_resume_repeats_an_uninterrupted_run(tiny, tmp_path):
    cfg = from_dict(fl(tiny, "foolsgold"))
    whole = run(cfg, out=tmp_path, name="whole", quiet=True)
    with pytest.raises(Interrupted):
        run(cfg, out=tmp_path, name="cut", hooks=[StopAfter(1)], quiet=True)
    assert RunFolder(tmp_path / "cut").read_summary()["status"] == "interrupted"
    resumed = resume(tmp_path / "cut", quiet=True)
    assert [r["round"] for r in rows(resumed)] == [1, 2]
    for key in ("clean_accuracy", "asr", "max_asr"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6)


def _mnist_files(folder: Path) -> None:
    """MNIST-layout IDX files made from the synthetic task, resized to 28x28."""
    import torch.nn.functional as F

    from backdoors.data import TASKS
    from backdoors.data.mnist import write_idx

    task = TASKS.build("synthetic", {"train_size": 256, "test_size": 64}, "task")
    for split, ds in (("train", task.train), ("t10k", task.test)):
        big = F.interpolate(ds.images.float(), size=28).round().byte()[:, 0]
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", big.numpy())
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", ds.labels.byte().numpy())


def test_legacy_training_py_runs_federated_rounds(tmp_path, monkeypatch, capsys):
    from backdoors.legacy import main

    data = tmp_path / "data"
    data.mkdir()
    _mnist_files(data)
    params = tmp_path / "fed.yaml"
    params.write_text(f"""
task: MNIST
synthesizer: Pattern
data_path: {data}
batch_size: 64
lr: 0.05
epochs: 2
loss_tasks: [normal, backdoor]
poisoning_proportion: 0.5
backdoor_label: 1
fl: true
fl_total_participants: 4
fl_no_models: 2
fl_local_epochs: 1
fl_eta: 2
fl_number_of_adversaries: 1
fl_single_epoch_attack: 2
fl_weight_scale: 2
fl_diff_privacy: true
fl_dp_noise: 0.0001
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--name", "fed", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "Backdoor False. Epoch: 1. Accuracy" in out and "Backdoor True . Epoch: 2." in out
    summary = RunFolder(Path(out.strip().splitlines()[-1].split(": ", 1)[1])).read_summary()
    assert summary["aggregator"] == "weak_dp" and summary["attack_rounds"] == [2]


def test_list_aggregators(capsys):
    assert cli_main(["list", "aggregators"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"original", "fedavg", "norm_clipping", "weak_dp", "median", "trimmed_mean", "krum",
            "multi_krum", "flame", "foolsgold", "fltrust", "rlr", "deepsight", "crfl",
            "fldetector", "indicator", "bulyan", "centered_clipping"} <= set(names)


def test_list_attackers(capsys):
    assert cli_main(["list", "attackers"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"model_replacement", "dba", "constrain_and_scale", "pgd", "neurotoxin",
            "chameleon"} <= set(names)


@pytest.mark.parametrize("defense", ["spectral_signatures", "abl"])
def test_defenses_that_need_the_central_training_set_are_refused(tiny, tmp_path, capsys,
                                                                  defense):
    cfg = fl(tiny)
    cfg["defenses"] = [defense]
    with pytest.raises(ConfigError, match=f"defenses\\[0\\]: {defense} .*federated"):
        run(from_dict(cfg), out=tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())  # refused before any run folder was made
