"""Which native key each Backdoors 101 flat-file key becomes, so that errors found in the
converted config name the key the user wrote."""

from __future__ import annotations

import re

from backdoors.errors import ConfigError

# The native key each legacy key becomes, most specific first (errors found in the native
# config are reported under the legacy key the user wrote; `--set` hints use it too).
NATIVE_KEYS = {
    "mgda_normalize": "attack.balancer.normalize", "fixed_scales": "attack.balancer.scales",
    "loss_balance": "attack.balancer", "loss_tasks": "attack.loss_terms",
    "poisoning_proportion": "attack.fraction", "loss_threshold": "attack.loss_threshold",
    "alternating_attack": "attack.alternating", "clip_batch": "attack.clip_batch",
    "backdoor_label": "synthesizer.target",
    "backdoor_dynamic_position": "synthesizer.dynamic", "synthesizer": "synthesizer.name",
    "data_path": "task.data_dir", "transform_train": "task.augment", "task": "task.name",
    "lr": "train.lr", "decay": "train.weight_decay", "momentum": "train.momentum",
    "epochs": "train.epochs", "start_epoch": "train.start_epoch",
    "batch_size": "train.batch_size", "test_batch_size": "train.test_batch_size",
    "log_interval": "train.log_interval", "max_batch_id": "train.max_batches",
    "optimizer": "train.optimizer", "scheduler_milestones": "train.milestones",
    "save_on_epochs": "train.save_on_epochs", "pretrained": "train.pretrained",
    "resume_model": "train.resume_model", "dp_clip": "train.dp_clip",
    "dp_sigma": "train.dp_sigma", "random_seed": "seed",
    "fl_no_models": "federated.per_round", "fl_total_participants": "federated.participants",
    "fl_local_epochs": "federated.local_epochs", "fl_eta": "federated.eta",
    "fl_number_of_adversaries": "federated.adversaries",
    "fl_single_epoch_attack": "federated.attack_round",
    "fl_weight_scale": "federated.weight_scale", "fl_dirichlet_alpha": "federated.alpha",
}


def legacy_error(exc: ConfigError) -> ConfigError:
    """The error of a config converted from a flat file, naming the legacy key it is
    about when it can tell (e.g. `backdoor_label` for synthesizer.target)."""
    message = str(exc)
    for legacy, native in NATIVE_KEYS.items():
        section, _, key = native.rpartition(".")
        named = native in message or bool(section) and message.startswith(section) and bool(
            re.search(rf"\b{re.escape(key)}\b", message))
        if named:
            return ConfigError(f"legacy key '{legacy}' ({native}): {message}")
    return exc
