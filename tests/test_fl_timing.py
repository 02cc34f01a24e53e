"""Federated attack timing (window, fraction, forced attackers, warm-up), the attacker
component's config errors, and durability in the summary."""

from __future__ import annotations

import pytest
from support import fl, rows

from backdoors.assembly.build import build
from backdoors.config import from_dict
from backdoors.config.federated import FederatedConfig
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.federated.outputs import durability
from backdoors.federated.population import sample_round


def attack_rounds(fc: FederatedConfig) -> list[int]:
    return [r for r in range(1, fc.rounds + 1) if fc.attacks_in(r)]


def test_default_timing_is_every_round_after_the_warm_up():
    assert attack_rounds(FederatedConfig(rounds=6, adversaries=1)) == [1, 2, 3, 4, 5, 6]
    assert attack_rounds(FederatedConfig(rounds=6, adversaries=1, warmup_rounds=2)) == \
        [3, 4, 5, 6]


def test_window_and_fraction():
    fc = FederatedConfig(rounds=20, adversaries=1, attack_window=[5, 12])
    assert attack_rounds(fc) == list(range(5, 13))
    half = FederatedConfig(rounds=20, adversaries=1, attack_window=[5, 12], attack_fraction=0.5)
    assert attack_rounds(half) == [5, 7, 9, 11]
    tenth = FederatedConfig(rounds=100, adversaries=1, attack_fraction=0.1)
    assert len(attack_rounds(tenth)) == 10 and attack_rounds(tenth)[:2] == [1, 11]


def test_warm_up_overrides_the_window():
    fc = FederatedConfig(rounds=10, adversaries=1, attack_window=[1, 5], warmup_rounds=3)
    assert attack_rounds(fc) == [4, 5]


def test_forced_attackers_are_in_every_attack_round_and_only_then():
    fc = FederatedConfig(rounds=8, participants=100, per_round=10, adversaries=10,
                         attackers_per_round=3, attack_window=[2, 4])
    for r in range(1, 9):
        sampled, bad = sample_round(fc, 1, r)
        assert len(sampled) == len(set(sampled)) == 10
        if 2 <= r <= 4:
            assert sum(bad) == 3 and all(p < 10 for p, b in zip(sampled, bad, strict=True) if b)
        else:
            assert not any(bad)


def test_unforced_attackers_attack_when_sampled_in_the_window():
    fc = FederatedConfig(rounds=30, participants=10, per_round=10, adversaries=2,
                         attack_window=[3, 4])
    for r in range(1, 31):
        sampled, bad = sample_round(fc, 0, r)
        assert sum(bad) == (2 if r in (3, 4) else 0)


@pytest.mark.parametrize("federated, needle", [
    ({"attack_window": [5, 2]}, "federated.attack_window must be [first, last]"),
    ({"attack_window": [0, 2]}, "federated.attack_window"),
    ({"attack_fraction": 0}, "federated.attack_fraction must be in (0, 1]"),
    ({"attackers_per_round": 3, "adversaries": 2}, "federated.attackers_per_round"),
    ({"warmup_rounds": 10, "rounds": 10}, "federated.warmup_rounds must be in [0, rounds=10)"),
    ({"attack_round": 2, "adversaries": 1, "attack_window": [1, 3]}, "cannot be combined"),
    ({"engine": "spark"}, "bad value for federated.engine"),
    ({"workers": 0}, "federated.workers must be >= 1"),
    ({"attacker": {"name": "model_replacment"}},
     "unknown federated attacker 'model_replacment' at federated.attacker.name (did you "
     "mean 'model_replacement'?)"),
    ({"attacker": {"name": "model_replacement", "scale": 3}}, "unknown key 'scale'"),
])
def test_bad_timing_and_attacker_options_are_one_line(federated, needle):
    cfg = {"task": {"name": "synthetic"}, "synthesizer": {"name": "pattern", "target": 1},
           "federated": federated}
    with pytest.raises(ConfigError) as info:
        build(from_dict(cfg))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_durability_counts_rounds_since_the_last_attack():
    made = [{"round": r, "attackers": [0] if r in (2, 3) else [], "asr": 1.0 - r / 10}
            for r in range(1, 9)]
    out = durability(made)
    assert out["last_attack_round"] == 3
    assert out["asr_since_attack"] == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2])
    assert out["asr_1_rounds_after"] == pytest.approx(0.6)
    assert out["asr_5_rounds_after"] == pytest.approx(0.2)
    assert "asr_10_rounds_after" not in out
    assert durability([{"round": 1, "attackers": [], "asr": 0.1}])["last_attack_round"] is None


def test_a_window_run_attacks_in_its_rounds_and_reports_the_tail(tiny, tmp_path):
    cfg = fl(tiny, "fedavg", attack_round=None, rounds=5, attack_window=[2, 3],
             attackers_per_round=1)
    summary = run(from_dict(cfg), out=tmp_path, quiet=True)
    got = rows(summary)
    assert [r["round"] for r in got if r["attackers"]] == [2, 3]
    assert summary["attack_rounds"] == [2, 3] and summary["last_attack_round"] == 3
    assert len(summary["asr_since_attack"]) == 2
    assert summary["attacker"] == "model_replacement"
