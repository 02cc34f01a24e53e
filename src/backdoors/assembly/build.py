"""Config -> components: every registered component built and cross-checked before any
data loads, and what a run folder records about them (resolved config, fingerprint)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from backdoors.attacks import ATTACKS, Attack
from backdoors.config import Component, Config, apply_overrides, from_dict, read_yaml
from backdoors.config.legacy_keys import legacy_error
from backdoors.data import TASKS, Task
from backdoors.defenses import DEFENSES, Defense
from backdoors.defenses.runner import check_fits
from backdoors.errors import ConfigError
from backdoors.federated import AGGREGATORS, ATTACKERS, Aggregator, Attacker
from backdoors.federated.ray_engine import check_ray
from backdoors.federated.wrappers import NESTED_KEYS
from backdoors.models import MODELS
from backdoors.registry import Registry
from backdoors.runs import RunFolder, check_finite, load_into, load_weights
from backdoors.seeds import DP_NOISE, derive
from backdoors.synthesizers import SYNTHESIZERS, Synthesizer
from backdoors.training.dp import DPSGD
from backdoors.training.optim import resolve_device

PRETRAINED_DIR = Path("~/.cache/backdoors/pretrained").expanduser()
# Keys that say where or how a run is watched, not what is trained: a run folder may be
# moved to other data paths or devices and still be the same experiment. File paths of
# data and trigger images are left out at any depth (the trigger's fingerprint covers
# what a trigger image holds).
UNFINGERPRINTED = {"name": None, "defenses": None,
                   "train": ("device", "progress", "tensorboard", "log_interval",
                             "save_on_epochs", "test_batch_size")}
WHERE_KEYS = ("data_dir", "image")
# Keys added after runs existed: fingerprinted only when set away from their default, so
# a run made before them still resumes.
LATER_KEYS = {"train": {"precision": "fp32", "channels_last": False, "compile": False,
                        "nesterov": False, "warmup": 0.2},
              "task": {"crop_padding": 4}}
# Paths written absolute in a run's config.yaml, so the folder works from any directory.
PATH_KEYS = (("task", "data_dir"), ("synthesizer", "image"), ("train", "pretrained"),
             ("train", "resume_model"))


@dataclass
class Components:
    task: Task
    model: nn.Module
    synthesizer: Synthesizer
    attack: Attack
    model_name: str
    device: torch.device
    aggregator: Aggregator | None = None
    attacker: Attacker | None = None
    defenses: list[Defense] = field(default_factory=list)


def build(config: Config, fresh: bool = True) -> Components:
    """Construct and cross-check every component; loads no data. `fresh`: for a new run,
    whose start weights (train.pretrained, resume_model) must exist; a run re-opened for
    resume or defenses has its own weights, and falls back to `auto` when the device it
    was trained on is missing here. Errors in a config converted from a Backdoors 101
    flat file name the legacy key."""
    try:
        return _build(config, fresh)
    except ConfigError as exc:
        raise (legacy_error(exc) if config.legacy_source else exc) from None


def _build(config: Config, fresh: bool) -> Components:
    task = TASKS.build(config.task.name, config.task.kwargs, "task")
    try:
        device = resolve_device(config.train.device)
    except ConfigError:
        if fresh:
            raise
        device = resolve_device("auto")
    model_cfg = config.model or Component(task.default_model)
    torch.manual_seed(config.seed)  # model initialisation is part of the seeded run
    model = MODELS.build(model_cfg.name, model_cfg.kwargs, "model",
                         num_classes=task.num_classes, input_shape=task.input_shape,
                         mean=task.mean, std=task.std)
    synthesizer = SYNTHESIZERS.build(config.synthesizer.name, config.synthesizer.kwargs,
                                     "synthesizer")
    try:
        synthesizer.bind(task.input_shape, task.num_classes)
    except ValueError as exc:
        raise ConfigError(f"synthesizer ({config.synthesizer.name}): {exc}") from None
    attack = ATTACKS.build(config.attack.name, config.attack.kwargs, "attack")
    attack.bind(synthesizer, model)
    if config.train.dp:  # DP-SGD wraps the attack's step; refuses what it cannot run
        attack = DPSGD(attack, model, config.train.dp_clip, config.train.dp_sigma,
                       seed=derive(config.seed, DP_NOISE))
    aggregator = attacker = None
    if config.federated is not None:
        aggregator = build_aggregator(config.federated.aggregator, config.federated.per_round)
        attacker = ATTACKERS.build(config.federated.attacker.name,
                                   config.federated.attacker.kwargs, "federated.attacker")
        if config.federated.engine == "ray":
            check_ray(attack)
    defenses = []
    for i, d in enumerate(config.defenses):
        defense = DEFENSES.build(d.name, d.kwargs, f"defenses[{i}]")
        check_fits(defense, config.federated is not None, f"defenses[{i}]")
        defenses.append(defense)
    comps = Components(task, model, synthesizer, attack, model_cfg.name, device, aggregator,
                       attacker, defenses)
    if fresh:  # a missing weights file is refused before anything runs
        start_path(config, comps, auto=False)
    return comps


def build_aggregator(component: Component, per_round: int) -> Aggregator:
    """A fresh aggregator (it may keep state across rounds, e.g. FoolsGold's history)."""
    aggregator = AGGREGATORS.build(component.name, component.kwargs, "federated.aggregator")
    try:
        aggregator.check(per_round)
    except ValueError as exc:
        raise ConfigError(f"federated.aggregator ({component.name}): {exc}") from None
    return aggregator


def resolved_config(config: Config, comps: Components) -> dict[str, Any]:
    """The config with every constructor default written out (for config.yaml)."""
    out = config.as_dict()
    if not out["defenses"]:
        del out["defenses"]
    sections: list[tuple[str, Registry[Any]]] = [
        ("task", TASKS), ("model", MODELS), ("synthesizer", SYNTHESIZERS), ("attack", ATTACKS)]
    for section, registry in sections:
        out[section] = _with_defaults(registry, out[section] or {"name": comps.model_name})
    if config.federated is not None:
        fed = out["federated"]
        fed["aggregator"] = _aggregator_defaults(fed["aggregator"])
        fed["attacker"] = _with_defaults(ATTACKERS, fed["attacker"])
    for section, key in PATH_KEYS:
        if key in out[section]:
            out[section][key] = _absolute(out[section][key])
    source = out["synthesizer"].get("source_task")
    if isinstance(source, dict) and "data_dir" in source:
        source["data_dir"] = _absolute(source["data_dir"])
    return out


def _absolute(value: Any) -> Any:
    """An absolute path for a relative one (`auto` and non-paths as they are)."""
    if not isinstance(value, str) or value in ("auto", ""):
        return value
    return str(Path(value).expanduser().resolve())


def _with_defaults(registry: Registry[Any], given: dict[str, Any]) -> dict[str, Any]:
    params = registry.parameters(given["name"])
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    return {"name": given["name"], **defaults, **{k: v for k, v in given.items() if k != "name"}}


def _aggregator_defaults(given: str | dict[str, Any]) -> dict[str, Any]:
    """An aggregator with its defaults, and those of the rules it wraps (`inner`, ...)."""
    out = _with_defaults(AGGREGATORS, {"name": given} if isinstance(given, str) else given)
    for key in NESTED_KEYS:
        if isinstance(out.get(key), (str, dict)):
            out[key] = _aggregator_defaults(out[key])
    return out


def fingerprint(resolved: dict[str, Any]) -> str:
    """A hash of what a resolved config trains (not where its data or device are)."""
    kept = {}
    for section, value in resolved.items():
        if section in UNFINGERPRINTED and UNFINGERPRINTED[section] is None:
            continue
        drop = UNFINGERPRINTED.get(section) or ()
        later = LATER_KEYS.get(section, {})
        kept[section] = {k: v for k, v in value.items()
                         if k not in drop and (k not in later or v != later[k])} \
            if isinstance(value, dict) else value
    return _digest(json.dumps(_without_where(kept), sort_keys=True, default=str).encode())


def _without_where(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_where(v) for k, v in value.items() if k not in WHERE_KEYS}
    if isinstance(value, list):
        return [_without_where(v) for v in value]
    return value


def trigger_fingerprint(synthesizer: Synthesizer) -> str:
    """A hash of the trigger's spec and learned tensors (after `prepare`)."""
    h = hashlib.sha256(json.dumps(synthesizer.spec(), sort_keys=True, default=str).encode())
    for name, value in sorted(synthesizer.state_tensors().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def start_path(config: Config, comps: Components, auto: bool = True) -> Path | None:
    """The weights file a fresh run starts from (train.pretrained or resume_model). With
    `auto` false, `pretrained: auto` is not looked up: like a dataset, cached weights are
    needed when the run starts, not to check a config."""
    tc = config.train
    if tc.pretrained:
        if tc.pretrained != "auto":
            return _existing(Path(tc.pretrained).expanduser(), "train.pretrained")
        if not auto:
            return None
        path = PRETRAINED_DIR / f"{comps.model_name}.safetensors"
        if not path.is_file():
            raise ConfigError(f"train.pretrained: auto found no local weights for "
                              f"'{comps.model_name}' at {path}; download them there or set "
                              "train.pretrained: PATH")
        return path
    if tc.resume_model:
        path = Path(tc.resume_model).expanduser()
        if not path.exists() and (Path("saved_models") / tc.resume_model).exists():
            path = Path("saved_models") / tc.resume_model  # Backdoors 101 looked there
        return _existing(path, "train.resume_model")
    return None


def _existing(path: Path, key: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{key}: weights file not found: {path}")
    return path


def load_start_weights(config: Config, comps: Components) -> int | None:
    """Load train.pretrained / train.resume_model into the model (refusing non-finite or
    ill-fitting weights); return the first epoch to train after a resume_model (the
    checkpoint's epoch + 1), else None."""
    path = start_path(config, comps)
    if path is None:
        return None
    key = "train.pretrained" if config.train.pretrained else "train.resume_model"
    state = load_weights(path)
    check_finite(state, f"{key} {path}")
    load_into(comps.model, state, f"{key} {path}")
    if config.train.pretrained or path.suffix == ".safetensors":
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    epoch = data.get("epoch", 0) if isinstance(data, dict) else 0
    return max(config.train.start_epoch, int(epoch) + 1) if isinstance(epoch, int) else None


def saved_config(folder: RunFolder, overrides: Sequence[str] = ()) -> Config:
    """A run's config.yaml, moved by `overrides` (`task.data_dir=...`, the device): an
    override that would change what the run trained is refused; accepted ones are written
    back to config.yaml, so the folder keeps working without them."""
    path = folder.path / "config.yaml"
    try:
        data = read_yaml(path)
        config = from_dict(apply_overrides(data, list(overrides)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if overrides:
        before = from_dict(data)
        comps = build(config, fresh=False)
        if fingerprint(resolved_config(config, comps)) != fingerprint(
                resolved_config(before, build(before, fresh=False))):
            raise ConfigError(f"--set {' '.join(overrides)} would change what {folder.path} "
                              "trained; only data paths, the device and logging options may "
                              "change")
        folder.write_config(yaml.safe_dump(resolved_config(config, comps), sort_keys=False))
    return config
