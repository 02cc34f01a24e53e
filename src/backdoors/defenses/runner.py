"""Run one defense against a finished attack and measure it.

The runner hands the defense only what it declared (a clean budget drawn from rows the
attack did not touch, the poisoned training set if it asked for it), lets the defense's
stage measure it (detection, removal, mitigation: defenses/measure.py) and adds the cost
(seconds, peak memory). Where results are written is the lifecycle's business.
"""

from __future__ import annotations

import copy
import resource
import sys
import time

import torch

from backdoors.data.dataset import ArrayDataset
from backdoors.defenses.base import Defense, DefenseData
from backdoors.defenses.measure import headline
from backdoors.defenses.progress import Progress
from backdoors.defenses.results import Outcome
from backdoors.defenses.target import DefenseTarget
from backdoors.errors import ConfigError
from backdoors.seeds import CLEAN_BUDGET, DEFENSE, stream


def clean_budget(target: DefenseTarget, fraction: float) -> ArrayDataset:
    """`fraction` of the training set, drawn (seeded) from rows the attack did not touch
    and the trigger did not take out of the main task."""
    pool = (~target.poisoned).nonzero().flatten()
    k = max(1, int(round(fraction * len(target.clean_train))))
    pick = torch.randperm(len(pool), generator=stream(target.seed, CLEAN_BUDGET))[:k]
    return target.clean_train.subset(pool[pick].sort().values)


def check_fits(defense: Defense, federated: bool, where: str) -> None:
    """Refuse a defense that needs the central training set on a federated run: no server
    holds the participants' (partly poisoned) data, and the poison indices a dataset-level
    score would be judged against are the attackers' own shares, not a central draw."""
    if federated and defense.uses_training_set:
        raise ConfigError(f"{where}: {defense.name} ({defense.stage} stage) needs the central "
                          "training set, which a federated run does not have; use an input, "
                          "inspection or repair defense (e.g. strip, neural_cleanse, "
                          "fine_pruning)")


def defense_data(target: DefenseTarget, defense: Defense) -> DefenseData:
    """What the defense may see: the clean budget and, if declared, the training set."""
    clean = clean_budget(target, defense.clean_fraction) if defense.uses_clean_data \
        else target.clean_train.subset(slice(0, 0))  # data-free: nothing to look at
    return DefenseData(
        clean=clean,
        num_classes=target.num_classes,
        input_shape=target.input_shape,
        device=target.device,
        generator=stream(target.seed, DEFENSE),
        train=target.train if defense.uses_training_set else None,
        batch_size=target.batch_size,
        progress=Progress(defense.name),
        precision=target.budget.train.precision,
    )


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_defense(target: DefenseTarget, defense: Defense) -> Outcome:
    """Apply one defense to a copy of the target's model and measure it."""
    check_fits(defense, target.federated, f"defense '{defense.name}'")
    data = defense_data(target, defense)
    before = target.evaluate(target.model)
    model = copy.deepcopy(target.model)
    if target.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target.device)
    start = time.perf_counter()
    measured = defense.measure(model, data, target, before)
    figures = {"defense": defense.name, "stage": defense.stage,
               "clean_samples": len(data.clean), "before": headline(before),
               **measured.figures,
               "seconds": time.perf_counter() - start,
               "peak_memory_mb": peak_memory_mb(target.device)}
    return Outcome(figures=figures, artifacts=measured.artifacts, model=measured.model)
