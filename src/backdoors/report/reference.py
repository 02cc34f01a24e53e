"""Published numbers to compare with: the BackdoorBench leaderboard (data/README.md says
where it comes from), matched to a run by dataset, model, attack, poisoning ratio and
defense."""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "backdoorbench_leaderboard.csv"
SOURCE = ("BackdoorBench leaderboard (Wu et al., NeurIPS 2022 Datasets and Benchmarks, "
          "arXiv 2206.12654; backdoorbench.github.io, commit b98eab4)")

# This project's names -> BackdoorBench's.
DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "gtsrb": "gtsrb",
            "tiny_imagenet": "tiny"}
MODELS = {"preact_resnet18": "preactresnet18", "vgg19_bn": "vgg19_bn",
          "convnext_tiny": "convnext_tiny", "vit_b_16": "vit_b_16"}
ATTACKS = {"pattern": "badnet", "blend": "blended", "bpp": "bpp", "input_aware": "inputaware",
           "label_consistent": "lc", "low_frequency": "lf", "sig": "sig",
           "trojan_nn": "trojannn", "wanet": "wanet"}
DEFENSES = {"fine_tuning": "ft", "fine_pruning": "fp", "nad": "nad", "neural_cleanse": "nc",
            "anp": "anp", "activation_clustering": "ac", "spectral_signatures": "spectral",
            "abl": "abl", "i_bau": "i-bau", "clp": "clp", "dbd": "dbd"}
FIGURES = ("clean_accuracy", "asr", "robust_accuracy")


@lru_cache(maxsize=1)
def _table() -> dict[tuple[str, str, str, str, float], dict[str, float]]:
    with open(DATA, newline="", encoding="utf-8") as f:
        return {(r["dataset"], r["model"], r["attack"], r["defense"], float(r["poison_ratio"])):
                {k: float(r[k]) for k in FIGURES} for r in csv.DictReader(f)}


def setting(config: dict[str, Any]) -> tuple[str, str, str, float] | None:
    """(dataset, model, attack, poisoning ratio) in BackdoorBench's names for a resolved
    run config, or None when BackdoorBench has no such setting."""
    task = (config.get("task") or {}).get("name")
    model = (config.get("model") or {}).get("name")
    attack = config.get("attack") or {}
    trigger = (config.get("synthesizer") or {}).get("name")
    if task not in DATASETS or model not in MODELS:
        return None
    if attack.get("name") == "blind":
        return DATASETS[task], MODELS[model], "blind", 0.1
    if trigger not in ATTACKS or attack.get("name") not in ("data", "batch"):
        return None
    # Training-controlled attacks (WaNet, input-aware) poison a share of each batch; their
    # BackdoorBench rows carry that share as the ratio. Input-aware's share is split between
    # backdoor and cross-trigger rows (label kept); BackdoorBench's ratio counts the former.
    ratio = float(attack.get("ratio" if attack["name"] == "data" else "fraction", 0.1))
    if trigger == "input_aware":
        synthesizer = config.get("synthesizer") or {}
        backdoor = float(synthesizer.get("backdoor_ratio", 0.1))
        ratio = round(ratio * backdoor / (backdoor + float(synthesizer.get("cross_ratio", 0.1))), 4)
    return DATASETS[task], MODELS[model], ATTACKS[trigger], ratio


def lookup(config: dict[str, Any], defense: str | None) -> dict[str, float] | None:
    """BackdoorBench's figures for this run's setting after `defense` (None: no defense),
    or None when it did not publish that cell."""
    found = setting(config)
    if found is None:
        return None
    name = "no defense" if defense is None else DEFENSES.get(defense)
    if name is None:
        return None
    dataset, model, attack, ratio = found
    return _table().get((dataset, model, attack, name, ratio))
