"""The attack artifact: what a run leaves for defenses, and defenses run on it.

A run writes attack.json (trigger spec, poison indices, fingerprints) and, for learned
triggers, trigger.safetensors. `reopen` turns a completed run folder back into a
DefenseTarget: the same components, the trained weights, and the training rows re-made
from their seeded streams, refusing a folder whose config or trigger no longer match
what was trained. Defense results go to defenses/NAME/ and the run's summary.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.assembly.build import (
    Components,
    build,
    fingerprint,
    resolved_config,
    saved_config,
    trigger_fingerprint,
)
from backdoors.assembly.data import (
    TrainingData,
    evaluation_loaders,
    mask_of,
    prepare_model,
    training_data,
)
from backdoors.config import Component, Config
from backdoors.data.dataset import ArrayDataset
from backdoors.defenses import DefenseTarget, TrainingBudget
from backdoors.errors import DataError, RunError
from backdoors.execution import accelerated
from backdoors.metrics import evaluate
from backdoors.models import MODELS
from backdoors.runs import (
    RunFolder,
    check_finite,
    load_commit,
    load_into,
    load_weights,
    save_weights,
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


def reopen(folder: RunFolder, overrides: Sequence[str] = ()) -> DefenseTarget:
    """A completed run as a DefenseTarget (loads the data again); `overrides` may move
    it (`task.data_dir=...`, see saved_config)."""
    status = folder.read_summary().get("status")
    if status != "completed":
        raise RunError(f"{folder.path} did not complete (status {status}); finish it with: "
                       f"backdoors train --resume {folder.path}")
    path = folder.path / "config.yaml"
    config = saved_config(folder, overrides)
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
        forward = accelerated(m, config.train, comps.device, whole=False)
        return evaluate(forward, test, comps.synthesizer, stream(config.seed, EVAL), backdoor)

    def fresh_model() -> nn.Module:
        """The architecture with the weights its training started from, built under the
        run's seed as `build` does, without disturbing the global random state, and fitted
        to the rows the run trained on where the model has data-dependent layers."""
        spec, task = config.model or Component(comps.model_name), comps.task
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            fresh = MODELS.build(spec.name, spec.kwargs, "model", num_classes=task.num_classes,
                                 input_shape=task.input_shape, mean=task.mean, std=task.std)
        fresh = fresh.to(comps.device)
        prepare_model(fresh, clean if train is None else train)
        return fresh

    augment = comps.task.augmentation()
    return DefenseTarget(
        model=model, clean_train=clean, train=None if config.federated else train,
        poisoned=poisoned, synthesizer=comps.synthesizer, test_loader=test,
        backdoor_loader=backdoor, evaluate=score, fresh_model=fresh_model,
        budget=TrainingBudget(config.train, augment), num_classes=comps.task.num_classes,
        input_shape=comps.task.input_shape, device=comps.device, seed=config.seed,
        batch_size=config.train.test_batch_size, federated=config.federated is not None)
