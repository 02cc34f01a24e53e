"""Helpers several test modules share: a hook that interrupts a run, and the tiny
federated configuration the federated tests start from."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from backdoors.hooks import Hook
from backdoors.runs import RunFolder


class StopAfter(Hook):
    """Interrupts a run (as Ctrl-C would) at the end of epoch, or federated round, `last`."""

    def __init__(self, last: int = 1) -> None:
        self.last = last

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: torch.nn.Module) -> None:
        if epoch == self.last:
            raise KeyboardInterrupt


def fl(tiny: dict[str, Any], aggregator: str = "original", **federated: Any) -> dict[str, Any]:
    """Ten participants, five per round, one attacker in round 2 poisoning half of its
    local data, boosted by N / eta = 5 (model replacement)."""
    cfg = copy.deepcopy(tiny)
    cfg["task"] = {"name": "synthetic", "test_size": 256}
    cfg["model"] = {"name": "tiny_cnn", "width": 8}
    cfg["attack"] = {"name": "data", "ratio": 0.5}
    cfg["federated"] = {"rounds": 2, "participants": 10, "per_round": 5, "local_epochs": 1,
                        "eta": 2, "adversaries": 1, "attack_round": 2, "weight_scale": 5,
                        "aggregator": aggregator, **federated}
    return cfg


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in RunFolder(Path(summary["run_dir"])).rows() if r["kind"] == "round"]
