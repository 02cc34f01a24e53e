"""The attack artifact: what a run leaves for defenses, and defenses run on it.

A run writes attack.json (trigger spec, poison indices, fingerprints) and, for learned
triggers, trigger.safetensors. `reopen` turns a completed run folder back into a
DefenseTarget: the same components, the trained weights, and the training rows re-made
from their seeded streams, refusing a folder whose config or trigger no longer match
what was trained. Defense results go to defenses/NAME/ and the run's summary.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.assembly.build import (
    Components,
    build,
    fingerprint,
    resolved_config,
    trigger_fingerprint,
)
from backdoors.assembly.data import TrainingData, evaluation_loaders, mask_of, training_data
from backdoors.config import Component, Config, from_dict, read_yaml
from backdoors.data.augment import random_crop_flip
from backdoors.data.dataset import ArrayDataset
from backdoors.defenses import DEFENSES, DefenseTarget, Outcome, TrainingBudget
from backdoors.defenses.figures import save_artifacts
from backdoors.defenses.runner import run_defense
from backdoors.defenses.scores import format_result
from backdoors.errors import ConfigError, DataError, RunError
from backdoors.metrics import evaluate
from backdoors.models import MODELS
from backdoors.runs import (
    RunFolder,
    RunLock,
    check_finite,
    load_commit,
    load_into,
    load_weights,
    save_weights,
    state_of,
)
from backdoors.seeds import EVAL, stream
from backdoors.synthesizers import Synthesizer


def write_artifact(folder: RunFolder, synthesizer: Synthesizer, attack: dict[str, Any],
                   poison_indices: Tensor, fingerprints: dict[str, str]) -> None:
    """trigger.safetensors (learned triggers) and attack.json."""
    trigger = synthesizer.state_tensors()
    if trigger:
        save_weights(folder.path / "trigger.safetensors",
                     {k: v.detach().contiguous().cpu() for k, v in trigger.items()})
    folder.write_json("attack.json", {
        "synthesizer": synthesizer.spec(), "attack": attack,
        "poisoned_samples": len(poison_indices), "poison_indices": poison_indices.tolist(),
        "fingerprint": fingerprints,
    })


def reopen(folder: RunFolder) -> DefenseTarget:
    """A completed run as a DefenseTarget (loads the data again)."""
    status = folder.read_summary().get("status")
    if status != "completed":
        raise RunError(f"{folder.path} did not complete (status {status}); finish it with: "
                       f"backdoors train --resume {folder.path}")
    path = folder.path / "config.yaml"
    try:
        config = from_dict(read_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    comps = build(config, fresh=False)
    commit = load_commit(folder)
    if commit is None:
        raise RunError(f"{folder.path} has no checkpoint commit; it is not a finished run")
    if fingerprint(resolved_config(config, comps)) != commit["fingerprint"]["config"]:
        raise RunError(f"{path} changed since the run was trained (its fingerprint differs); "
                       "restore it, or train a new run with the new config")
    data = training_data(config, comps, central=config.federated is None)
    if trigger_fingerprint(comps.synthesizer) != commit["fingerprint"]["trigger"]:
        raise RunError(f"{folder.path}: the trigger re-made from the config differs from the "
                       "one trained (another torch version or device?)")
    if not isinstance(data.clean_train, ArrayDataset):
        raise DataError("defenses need an in-memory training set; this task streams its "
                        "images")
    poisoned = data.poisoned if config.federated is None else _federated_poison(folder, data)
    return _target(config, comps, folder, data.clean_train, data.train, poisoned)


def _federated_poison(folder: RunFolder, data: TrainingData) -> Tensor:
    """Rows the federated attackers poisoned, as their run recorded them."""
    rows = folder.read_json("attack.json").get("poison_indices")
    n = len(data.clean_train)
    if not isinstance(rows, list) or not all(isinstance(i, int) and 0 <= i < n for i in rows):
        raise RunError(f"{folder.path}/attack.json is damaged (poison_indices must be rows "
                       f"0..{n - 1})")
    return mask_of(torch.tensor(rows, dtype=torch.long), n)


def _target(config: Config, comps: Components, folder: RunFolder, clean: ArrayDataset,
            train: Any, poisoned: Tensor) -> DefenseTarget:
    model = comps.model.to(comps.device)
    weights = folder.checkpoints / "last.safetensors"
    state = load_weights(weights)
    check_finite(state, str(weights))
    load_into(model, state, str(weights))
    model.eval()
    test, backdoor = evaluation_loaders(comps, config.train.test_batch_size)

    def score(m: nn.Module) -> dict[str, Any]:
        return evaluate(m, test, comps.synthesizer, stream(config.seed, EVAL), backdoor)

    def fresh_model() -> nn.Module:
        """The architecture with the weights its training started from, built under the
        run's seed as `build` does, without disturbing the global random state."""
        spec, task = config.model or Component(comps.model_name), comps.task
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            fresh = MODELS.build(spec.name, spec.kwargs, "model", num_classes=task.num_classes,
                                 input_shape=task.input_shape, mean=task.mean, std=task.std)
        return fresh.to(comps.device)

    augment = (lambda x, g: random_crop_flip(x, generator=g)) if comps.task.augment else None
    return DefenseTarget(
        model=model, clean_train=clean, train=None if config.federated else train,
        poisoned=poisoned, synthesizer=comps.synthesizer, test_loader=test,
        backdoor_loader=backdoor, evaluate=score, fresh_model=fresh_model,
        budget=TrainingBudget(config.train, augment), num_classes=comps.task.num_classes,
        input_shape=comps.task.input_shape, device=comps.device, seed=config.seed,
        batch_size=config.train.test_batch_size, federated=config.federated is not None)


def defense_key(defense: Component) -> str:
    """Where a defense's result lives: defenses/NAME/, or defenses/NAME-<hash>/ when it
    was given options, so results under different options never overwrite each other."""
    if not defense.kwargs:
        return defense.name
    text = json.dumps(defense.kwargs, sort_keys=True, default=str)
    return f"{defense.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def record(folder: RunFolder, defense: Component, outcome: Outcome) -> str:
    """defenses/KEY/: result.json (with the options), PNG figures and, for a defense that
    made a model, model.safetensors; the result also goes under `defenses` in
    summary.json. Returns the key."""
    key = defense_key(defense)
    figures = {**outcome.figures, "options": defense.kwargs}
    folder.write_json(f"defenses/{key}/result.json", figures)
    save_artifacts(folder.path / "defenses" / key, outcome.artifacts, figures)
    vectors = {k: v.detach().cpu().contiguous() for k, v in outcome.artifacts.items()
               if v.dim() == 1}
    if vectors:  # the raw scores, for reports (histograms by poisoned / clean)
        save_weights(folder.path / "defenses" / key / "scores.safetensors", vectors)
    if outcome.model is not None:
        save_weights(folder.path / "defenses" / key / "model.safetensors",
                     state_of(outcome.model))
    summary = folder.read_summary()
    summary.setdefault("defenses", {})[key] = figures
    folder.write_summary(summary)
    return key


def defend(run_dir: Any, name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run defense `name` (with constructor `kwargs`) on the completed run in `run_dir`;
    return its figures."""
    component = Component(name, dict(kwargs or {}))
    defense = DEFENSES.build(name, component.kwargs, f"defense '{name}'")
    folder = RunFolder.existing(run_dir)
    with RunLock(folder.path, f"running defense {name}"):
        outcome = run_defense(reopen(folder), defense)
        record(folder, component, outcome)
    return {**outcome.figures, "options": component.kwargs}


def defend_all(folder: RunFolder, defenses: Sequence[Component], quiet: bool,
               errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Defenses, in order, on the finished run (re-opened once); returns the summary.
    With `errors`, a defense that fails is recorded there (key -> one line) and the others
    still run; without, the failure is raised."""
    with RunLock(folder.path, "running defenses"):
        target = reopen(folder)
        for i, d in enumerate(defenses):
            try:
                defense = DEFENSES.build(d.name, d.kwargs, f"defenses[{i}]")
                outcome = run_defense(target, defense)
                record(folder, d, outcome)
            except Exception as exc:
                if errors is None:
                    raise
                errors[defense_key(d)] = (str(exc).splitlines() or [type(exc).__name__])[0]
                continue
            if not quiet:
                print(format_result(outcome.figures), flush=True)
    return folder.read_summary()
