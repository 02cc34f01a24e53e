"""Warm start of federated runs: benign warm-up rounds before any attack, and a run that
starts from another federated run's final global model (train.pretrained)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import fl, rows

from backdoors.config import FederatedConfig, from_dict
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.federated.population import sample_round


@pytest.mark.parametrize("timing", [{}, {"attackers_per_round": 2},
                                    {"attack_window": [1, 8]}, {"attack_fraction": 0.5}])
def test_no_attacker_trains_in_the_warmup_rounds(timing):
    fc = FederatedConfig(rounds=8, participants=10, per_round=5, adversaries=4,
                         warmup_rounds=3, **timing)
    bad = {r: sample_round(fc, 0, r)[1] for r in range(1, 9)}
    assert not any(any(bad[r]) for r in (1, 2, 3))
    assert any(any(bad[r]) for r in range(4, 9))  # the attack does start afterwards
    assert not any(fc.attacks_in(r) for r in (1, 2, 3)) and fc.attacks_in(4)


@pytest.mark.parametrize("timing, needle", [
    ({"attack_round": 2, "adversaries": 1}, "attack_round (2) must come after"),
    ({"attack_window": [1, 3], "adversaries": 1}, "attack_window [1, 3] ends within"),
])
def test_an_attack_only_inside_the_warmup_is_refused(timing, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]")):
        FederatedConfig(rounds=8, participants=10, per_round=5, warmup_rounds=3, **timing)


def test_a_run_warm_started_from_a_federated_run_starts_at_its_accuracy(tiny, tmp_path,
                                                                        one_thread):
    """Three benign FedAvg rounds, then a one-round run from their final weights file: its
    first round is as accurate as the source's last, a cold first round is not."""
    def benign(rounds: int, pretrained: str | None = None) -> dict:
        cfg = fl(tiny, "fedavg", rounds=rounds, adversaries=0, attack_round=None)
        cfg["train"]["lr"] = 0.02  # slow enough that one cold round is far from converged
        cfg["train"]["pretrained"] = pretrained
        return run(from_dict(cfg), out=tmp_path, quiet=True)

    source = benign(4)
    weights = Path(source["run_dir"]) / "checkpoints" / "last.safetensors"
    warm = rows(benign(1, str(weights)))[0]["clean_accuracy"]
    cold = rows(benign(1))[0]["clean_accuracy"]
    final = rows(source)[-1]["clean_accuracy"]
    assert final > cold + 0.15  # the source did learn beyond one round
    assert warm >= final - 0.05 and warm > cold + 0.15
