"""Behaviour: every injection method implants the backdoor while clean accuracy holds."""

from __future__ import annotations

import json

import pytest
import torch

from backdoors.assembly.build import build
from backdoors.attacks import ATTACKS
from backdoors.config import from_dict
from backdoors.data import TASKS
from backdoors.experiment import run

ATTACK_CASES = {
    "data": {"name": "data", "ratio": 0.1},
    "batch": {"name": "batch", "fraction": 0.2},
    "blind": {"name": "blind"},
    "blind_fixed": {"name": "blind", "balancer": {"name": "fixed"}},
    "blind_mgda_l2": {"name": "blind", "balancer": {"name": "mgda", "normalize": "l2"}},
}


def test_every_registered_attack_has_a_behaviour_case():
    assert {c["name"] for c in ATTACK_CASES.values()} | {"none"} == set(ATTACKS.names())


def test_clean_training_has_no_backdoor(tiny, tmp_path):
    summary = run(from_dict(tiny), out=tmp_path, quiet=True)
    assert summary["clean_accuracy"] > 0.9
    assert summary["asr"] < 0.1


@pytest.mark.parametrize("case", sorted(ATTACK_CASES))
def test_attack_raises_asr_and_keeps_clean_accuracy(case, tiny, tmp_path):
    tiny["attack"] = ATTACK_CASES[case]
    summary = run(from_dict(tiny), out=tmp_path, quiet=True)
    assert summary["asr"] > 0.8, summary
    assert summary["clean_accuracy"] > 0.9, summary
    assert summary["robust_accuracy"] < 0.2


def test_data_poisoning_records_indices_and_poisons_that_many(tiny, tmp_path):
    tiny["attack"] = {"name": "data", "ratio": 0.05}
    summary = run(from_dict(tiny), out=tmp_path, name="d", quiet=True)
    artifact = json.loads((tmp_path / "d" / "attack.json").read_text())
    n_train = len(TASKS.build("synthetic", {}, "task").train)
    assert summary["poisoned_samples"] == round(0.05 * n_train) == len(artifact["poison_indices"])
    assert artifact["synthesizer"]["target"] == 1


def test_data_poisoning_changes_only_chosen_rows():
    comps = build(from_dict({"task": "synthetic", "synthesizer": {"name": "pattern", "target": 1},
                             "attack": {"name": "data", "indices": [0, 5, 7]}}))
    clean = comps.task.train
    poisoned, idx = comps.attack.poison_training_set(clean, torch.Generator().manual_seed(0))
    assert idx.tolist() == [0, 5, 7]
    changed = (poisoned.images != clean.images).flatten(1).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {0, 5, 7} and changed
    assert poisoned.labels[idx].tolist() == [1, 1, 1]
    keep = torch.ones(len(clean), dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(poisoned.labels[keep], clean.labels[keep])


def test_clean_label_poisoning_touches_only_target_class():
    comps = build(from_dict({"task": "synthetic", "synthesizer": {"name": "pattern", "target": 2},
                             "attack": {"name": "data", "ratio": 0.05, "clean_label": True}}))
    clean = comps.task.train
    poisoned, idx = comps.attack.poison_training_set(clean, torch.Generator().manual_seed(0))
    assert len(idx) > 0 and bool((clean.labels[idx] == 2).all())
    assert torch.equal(poisoned.labels, clean.labels)


def test_loss_threshold_delays_the_attack(tiny):
    tiny["attack"] = {"name": "blind", "loss_threshold": 0.5}
    comps = build(from_dict(tiny))
    batch = next(iter(_loader(comps)))
    report = comps.attack.backward(comps.model, batch, torch.Generator().manual_seed(0))
    assert set(report.losses) == {"normal"}  # fewer than 1000 batches seen: no backdoor term
    comps.attack.recent_normal.extend([0.1] * 1000)
    report = comps.attack.backward(comps.model, batch, torch.Generator().manual_seed(0))
    assert set(report.losses) == {"normal", "backdoor"}


def test_alternating_attack_attacks_about_that_share_of_batches(tiny):
    tiny["attack"] = {"name": "blind", "alternating": 0.3, "balancer": {"name": "fixed"}}
    comps = build(from_dict(tiny))
    batch = next(iter(_loader(comps)))
    gen = torch.Generator().manual_seed(0)
    attacked = sum("backdoor" in comps.attack.backward(comps.model, batch, gen).losses
                   for _ in range(200))
    assert 35 <= attacked <= 85


def test_clip_batch_truncates_batches(tiny):
    tiny["attack"] = {"name": "blind", "clip_batch": 5}
    comps = build(from_dict(tiny))
    seen = []
    comps.model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    comps.attack.backward(comps.model, next(iter(_loader(comps))), torch.Generator())
    assert seen == [5, 5]


def _loader(comps):
    from backdoors.data import Loader

    return Loader(comps.task.train, 32, torch.device("cpu"), shuffle=True,
                  generator=torch.Generator().manual_seed(0))
