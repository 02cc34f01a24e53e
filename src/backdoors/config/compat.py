"""Backdoors 101 compatibility: flat legacy YAML files -> native config mappings.

The original (github: ebagdasa/backdoors101; Blind Backdoors, arXiv 2005.03823) read one
flat YAML file of `Params` fields. Every documented key is accepted here; unknown keys are
rejected by name. Where the original misbehaved, the intended behaviour is used:
`scheduler: true` builds the cosine schedule (never built originally), `resume_model`
continues at the next epoch, and `backdoor_dynamic_position` keeps the pattern's
transparent cells transparent. `poison_images` / `poison_images_test` select the semantic
synthesizer, and the `sums` loss task the MultiMNIST calculator (see `_calculator`).
`fl: true` adds the native `federated:` section (see `_federated`).
"""

from __future__ import annotations

import inspect
from typing import Any

from backdoors.config.train import TrainConfig
from backdoors.errors import ConfigError, did_you_mean
from backdoors.typecheck import matches_type, type_name

LEGACY_KEYS = frozenset("""
task synthesizer random_seed epochs start_epoch log_interval pretrained resume_model lr
decay momentum optimizer scheduler scheduler_milestones data_path batch_size test_batch_size
transform_train max_batch_id dp dp_clip dp_sigma backdoor backdoor_label poisoning_proportion
backdoor_dynamic_position loss_tasks loss_balance mgda_normalize fixed_scales loss_threshold
poison_images poison_images_test alternating_attack clip_batch switch_to_eval nc_p_norm
spectral_similarity report_train_loss log tb save_model save_on_epochs save_scale_values
print_memory_consumption save_timing fl fl_no_models fl_local_epochs fl_total_participants
fl_eta fl_sample_dirichlet fl_dirichlet_alpha fl_diff_privacy fl_dp_clip fl_dp_noise
fl_number_of_adversaries fl_single_epoch_attack fl_weight_scale name commit device
""".split())

NATIVE_SECTIONS = frozenset({"name", "seed", "task", "model", "train", "synthesizer", "attack"})

TASKS = {"mnist": "mnist", "cifar10": "cifar10", "imagenet": "image_folder",
         "multimnist": "multimnist", "pipa": "pipa", "cifarfed": "cifar10"}
SYNTHESIZERS = {"pattern": "pattern", "singlepixel": "single_pixel", "complex": "complex",
                "physical": "physical"}
# Backdoors 101's Physical synthesizer was a stub. Here it is the physical trigger as a
# white square covering 30-50% of the image side at a random place: large enough for
# the original's small MNIST network to learn under the blind attack (92.9% backdoor
# accuracy, 97.3% clean after 2 epochs on the MNIST split; the physical trigger's own
# defaults, a 15-30% object at random angles and brightness, reach 76% there).
PHYSICAL = {"shape": "square", "scale": [0.3, 0.5], "max_rotation": 0.0,
            "brightness": [1.0, 1.0]}


def is_legacy(data: dict[str, Any]) -> bool:
    """A legacy file uses flat keys (lr, loss_tasks, ...) instead of native sections."""
    return any(k in LEGACY_KEYS and k not in NATIVE_SECTIONS for k in data) or (
        isinstance(data.get("task"), str) and "train" not in data and "lr" in data
    )


def _lookup(table: dict[str, str], value: Any, key: str) -> str:
    name = str(value).lower().replace("-", "").replace("_", "")
    if name not in table:
        raise ConfigError(f"legacy key '{key}': unsupported value {value!r}"
                          f"{did_you_mean(name, table)}; expected one of: {', '.join(table)}")
    return table[name]


def convert_legacy(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Translate a flat Backdoors 101 mapping into a native config mapping."""
    for key in data:
        if key not in LEGACY_KEYS:
            raise ConfigError(f"{source}: unknown legacy key '{key}'"
                              f"{did_you_mean(key, LEGACY_KEYS)}")
    data = {k: v for k, v in data.items() if v is not None}  # null means "the default"
    get = data.get
    task_name = _lookup(TASKS, get("task", "MNIST"), "task")
    task: dict[str, Any] = {"name": task_name}
    if get("data_path"):
        task["data_dir"] = str(get("data_path"))
    if task_name == "image_folder":
        task["num_classes"] = 1000  # Backdoors 101's Imagenet task is ImageNet-1k
    if get("transform_train") is False and task_name in ("cifar10", "image_folder"):
        task["augment"] = False

    synthesizer: dict[str, Any] = {
        "name": _lookup(SYNTHESIZERS, get("synthesizer", "Pattern"), "synthesizer"),
        "target": _int(data, "backdoor_label", 8),
    }
    if get("backdoor_dynamic_position"):
        synthesizer["dynamic"] = True
    if synthesizer["name"] == "physical":
        synthesizer.update(PHYSICAL)
    loss_terms = [str(t) for t in _list(data, "loss_tasks") or ["normal"]]
    if get("poison_images") or get("poison_images_test"):
        synthesizer = _semantic(data)
    if "sums" in loss_terms:
        synthesizer, loss_terms = _calculator(task_name, loss_terms)

    attack: dict[str, Any] = {
        "name": "blind",
        "loss_terms": _evasion_terms(loss_terms, data),
        "fraction": _float(data, "poisoning_proportion", 1.0),
        "balancer": _balancer(data),
    }
    for legacy, native in (("loss_threshold", "loss_threshold"),
                           ("alternating_attack", "alternating"), ("clip_batch", "clip_batch")):
        if get(legacy) is not None:
            attack[native] = get(legacy)

    out: dict[str, Any] = {
        "name": str(get("name") or task_name),
        "seed": _int(data, "random_seed", 0),
        "task": task,
        "train": _train(data),
        "synthesizer": synthesizer,
        "attack": attack,
    }
    if get("fl"):
        out["federated"] = _federated(data)
        # Federated clients train with a constant lr (each round starts a fresh local
        # optimiser, as in the original, which built no schedule for them).
        for key in ("scheduler", "milestones"):
            out["train"].pop(key, None)
    return out


def _federated(data: dict[str, Any]) -> dict[str, Any]:
    """fl_* keys -> the native `federated:` section; `epochs` counts rounds. Missing keys
    take the original defaults (100 of 80,000 participants per round, 2 local epochs,
    eta 1). The Dirichlet split is the fixed one (sizes add up); fl_diff_privacy selects
    the weak_dp aggregator (clip each update to fl_dp_clip, noise fl_dp_noise)."""
    get = data.get
    fed: dict[str, Any] = {
        "rounds": _int(data, "epochs", 1),
        "participants": _int(data, "fl_total_participants", 80000),
        "per_round": _int(data, "fl_no_models", 100),
        "local_epochs": _int(data, "fl_local_epochs", 2),
        "eta": _float(data, "fl_eta", 1),
        "adversaries": _int(data, "fl_number_of_adversaries", 0),
        "weight_scale": _float(data, "fl_weight_scale", 1),
    }
    if get("fl_sample_dirichlet"):
        fed["split"] = "dirichlet"
        if get("fl_dirichlet_alpha") is not None:
            fed["alpha"] = _float(data, "fl_dirichlet_alpha", 0.9)
    if get("fl_single_epoch_attack") is not None:
        fed["attack_round"] = _int(data, "fl_single_epoch_attack", 0)
    if get("fl_diff_privacy"):
        fed["aggregator"] = {"name": "weak_dp"}
        if get("fl_dp_clip") is not None:
            fed["aggregator"]["clip"] = _float(data, "fl_dp_clip", 0)
        if get("fl_dp_noise") is not None:
            fed["aggregator"]["noise"] = _float(data, "fl_dp_noise", 0)
    return fed


def _int(data: dict[str, Any], key: str, default: int) -> int:
    """An integer legacy value (a whole float such as 10.0 counts), else one clear line."""
    value = data.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"legacy key '{key}' must be an integer, got {value!r}")
    return value


def _float(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"legacy key '{key}' must be a number, got {value!r}")
    return float(value)


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise ConfigError(f"legacy key '{key}' must be a list, got {value!r}")
    return list(value)


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"legacy key '{key}' must be a mapping, got {value!r}")
    return dict(value)


def _indices(value: Any, key: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
        raise ConfigError(f"legacy key '{key}' must be a list of training-set indices")
    return list(value)


def _semantic(data: dict[str, Any]) -> dict[str, Any]:
    """poison_images (trained on) and poison_images_test (held out, scored) -> the semantic
    synthesizer; as in the original, no pixel trigger is used then."""
    if not data.get("poison_images"):
        raise ConfigError("legacy key 'poison_images_test' needs 'poison_images' (the "
                          "semantic images the attack trains on)")
    out: dict[str, Any] = {"name": "semantic", "target": _int(data, "backdoor_label", 8),
                           "train_indices": _indices(data["poison_images"], "poison_images")}
    if data.get("poison_images_test"):
        out["test_indices"] = _indices(data["poison_images_test"], "poison_images_test")
    return out


def _evasion_terms(names: list[str], data: dict[str, Any]) -> list[Any]:
    """Legacy loss task names -> native loss terms with their options. The original split
    Neural Cleanse evasion into `neural_cleanse_part1` (the reverse step, which the native
    `neural_cleanse` term runs itself, so it folds in) and `mask_norm` (the mask penalty,
    weighed against it by the balancer: the native `mask_norm` term)."""
    out: list[Any] = []
    for name in names:
        if name == "neural_cleanse_part1":
            name = "neural_cleanse"
        if any((t if isinstance(t, str) else t["name"]) == name for t in out):
            continue
        if name == "neural_cleanse" and data.get("nc_p_norm") is not None:
            out.append({"name": name, "p_norm": _int(data, "nc_p_norm", 1)})
        elif name == "spectral_evasion" and data.get("spectral_similarity") is not None:
            out.append({"name": name, "similarity": str(data["spectral_similarity"])})
        else:
            out.append(name)
    return out


def _calculator(task_name: str, loss_terms: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The `sums` loss task was the calculator's "+" backdoor on MultiMNIST, next to the
    `backdoor` task's "x" backdoor, each its own MGDA task. Here both triggers share the
    calculator synthesizer and one `backdoor` loss term (half of the poisoned rows each)."""
    if task_name != "multimnist":
        raise ConfigError("legacy loss task 'sums' (the calculator's sum backdoor) needs "
                          "task: MultiMNIST")
    operations = ["sum", "product"] if "backdoor" in loss_terms else ["sum"]
    terms = [t for t in loss_terms if t != "sums"]
    if "backdoor" not in terms:
        terms.append("backdoor")
    return {"name": "calculator", "operations": operations}, terms


def _balancer(data: dict[str, Any]) -> dict[str, Any]:
    mode = str(data.get("loss_balance", "MGDA")).lower()
    if mode == "mgda":
        norm = data.get("mgda_normalize")
        return {"name": "mgda", "normalize": "none" if norm is None else str(norm)}
    if mode == "fixed":
        return {"name": "fixed", "scales": _mapping(data, "fixed_scales")}
    raise ConfigError(f"legacy key 'loss_balance': expected MGDA or fixed, got {mode!r}")


def _train(data: dict[str, Any]) -> dict[str, Any]:
    get = data.get
    train: dict[str, Any] = {}
    simple = {"epochs": "epochs", "start_epoch": "start_epoch", "lr": "lr",
              "momentum": "momentum", "decay": "weight_decay", "batch_size": "batch_size",
              "test_batch_size": "test_batch_size", "log_interval": "log_interval",
              "max_batch_id": "max_batches", "tb": "tensorboard",
              # DP-SGD (crashed in the original): dp_sigma is the noise multiplier.
              "dp": "dp", "dp_clip": "dp_clip", "dp_sigma": "dp_sigma"}
    hints = inspect.get_annotations(TrainConfig, eval_str=True)
    for legacy, native in simple.items():
        if get(legacy) is not None:
            if not matches_type(get(legacy), hints[native]):
                raise ConfigError(f"legacy key '{legacy}' must be {type_name(hints[native])}, "
                                  f"got {get(legacy)!r}")
            train[native] = get(legacy)
    if get("optimizer") is not None:
        train["optimizer"] = _lookup({"sgd": "sgd", "adam": "adam"}, get("optimizer"), "optimizer")
    if get("scheduler_milestones"):
        train["scheduler"] = "multistep"
        train["milestones"] = _list(data, "scheduler_milestones")
    elif get("scheduler"):
        train["scheduler"] = "cosine"
    if get("save_on_epochs"):
        train["save_on_epochs"] = _list(data, "save_on_epochs")
    if get("pretrained"):
        train["pretrained"] = get("pretrained") if isinstance(get("pretrained"), str) else "auto"
    if get("resume_model"):
        train["resume_model"] = str(get("resume_model"))
    return train
