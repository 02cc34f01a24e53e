"""Native configuration: YAML sections, dotted overrides, validation with did-you-mean.

A config has sections `name, seed, task, model, train, synthesizer, attack, defenses` and
the optional `federated` (backdoors.federated.settings). Components
(task, model, synthesizer, attack) are `{name: ..., **kwargs}` checked against their
constructor's signature; `train` is the TrainConfig dataclass. Legacy Backdoors 101 flat
files are detected and converted by `backdoors.compat`. Config objects are frozen.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from backdoors.errors import ConfigError, did_you_mean
from backdoors.typecheck import matches_type, type_name

if TYPE_CHECKING:
    from backdoors.federated.settings import FederatedConfig

SECTIONS = ("name", "seed", "task", "model", "train", "synthesizer", "attack", "defenses",
            "federated")
COMPONENTS = ("task", "model", "synthesizer", "attack")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. Epochs are counted from 1.

    scheduler: none, cosine (annealing over all epochs) or multistep (lr * gamma at each
    of `milestones`). device: auto (CUDA when available, else CPU), cpu, cuda, cuda:N.
    pretrained: a weights file (safetensors or a checkpoint) to start from; resume_model:
    a checkpoint whose weights are loaded and whose epoch + 1 is the first epoch trained.
    dp: DP-SGD (docs/privacy.md): clip each sample's gradient to L2 norm `dp_clip`, add
    Gaussian noise with std `dp_sigma` * `dp_clip`; epsilon is reported for `dp_delta`.
    """

    epochs: int = 10
    start_epoch: int = 1
    batch_size: int = 64
    test_batch_size: int = 256
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: Literal["none", "cosine", "multistep"] = "none"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    device: str = "auto"
    max_batches: int | None = None
    log_interval: int = 100
    save_on_epochs: list[int] = field(default_factory=list)
    tensorboard: bool = True
    progress: bool = True
    pretrained: str | None = None
    resume_model: str | None = None
    dp: bool = False
    dp_clip: float = 1.0
    dp_sigma: float = 1.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        for key in ("epochs", "start_epoch", "batch_size", "test_batch_size", "log_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"train.max_batches must be >= 1, got {self.max_batches}")
        if self.dp_clip <= 0:
            raise ConfigError(f"train.dp_clip must be > 0, got {self.dp_clip}")
        if self.dp_sigma < 0:
            raise ConfigError(f"train.dp_sigma must be >= 0, got {self.dp_sigma}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"train.dp_delta must be in (0, 1), got {self.dp_delta}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got "
                              f"'{self.device}'")


@dataclass(frozen=True)
class Component:
    """A registered component's name and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.kwargs}


@dataclass(frozen=True)
class Config:
    name: str
    seed: int
    task: Component
    model: Component | None
    train: TrainConfig
    synthesizer: Component
    attack: Component
    defenses: tuple[Component, ...] = ()
    federated: FederatedConfig | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data, as written to a run's config.yaml."""
        return {
            "name": self.name,
            "seed": self.seed,
            "task": self.task.as_dict(),
            "model": None if self.model is None else self.model.as_dict(),
            "train": dataclasses.asdict(self.train),
            "synthesizer": self.synthesizer.as_dict(),
            "attack": self.attack.as_dict(),
            "defenses": [d.as_dict() for d in self.defenses],
            **({"federated": self.federated.as_dict()} if self.federated else {}),
        }


DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "model": None,
    "synthesizer": {"name": "pattern"},
    "attack": {"name": "blind"},
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping (safe loader: config text is never executed)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], parsed value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set: bad key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with each `key.sub=value` set (intermediate mappings created)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, str) and part in COMPONENTS:
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{'.'.join(parts[: i + 1])}' is not a section")
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _component(data: Any, section: str) -> Component:
    if isinstance(data, str):
        return Component(data)
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"section '{section}' needs a 'name' (e.g. {section}: {{name: ...}})")
    if not isinstance(data["name"], str):
        raise ConfigError(f"{section}.name must be a string, got {data['name']!r}")
    return Component(data["name"], {k: v for k, v in data.items() if k != "name"})


def _train(data: Any) -> TrainConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("section 'train' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = inspect.get_annotations(TrainConfig, eval_str=True)
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{key}' in train{did_you_mean(key, fields)}")
        if not matches_type(value, hints[key]):
            expected = type_name(hints[key])
            raise ConfigError(f"bad value for train.{key}: {value!r} is not {expected}")
    return TrainConfig(**data)


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a native config mapping (structure and types; components by name)."""
    from backdoors.federated.settings import parse_federated  # imports this module

    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"unknown section '{key}'{did_you_mean(key, SECTIONS)}; "
                              f"expected: {', '.join(SECTIONS)}")
    if "task" not in data:
        raise ConfigError("missing section 'task' (e.g. task: {name: digits})")
    merged = {**DEFAULTS, **data}
    if not isinstance(merged["name"], str) or not merged["name"]:
        raise ConfigError(f"name must be a non-empty string, got {merged['name']!r}")
    if not isinstance(merged["seed"], int) or isinstance(merged["seed"], bool):
        raise ConfigError(f"seed must be an integer, got {merged['seed']!r}")
    return Config(
        name=merged["name"],
        seed=merged["seed"],
        task=_component(merged["task"], "task"),
        model=None if merged["model"] is None else _component(merged["model"], "model"),
        train=_train(merged.get("train")),
        synthesizer=_component(merged["synthesizer"], "synthesizer"),
        attack=_component(merged["attack"], "attack"),
        defenses=_defenses(merged.get("defenses")),
        federated=parse_federated(merged.get("federated")),
    )


def _defenses(data: Any) -> tuple[Component, ...]:
    """`defenses:` is a list of components run, in order, after training."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError("section 'defenses' must be a list, e.g. defenses: [strip, "
                          "{name: fine_pruning}]")
    return tuple(_component(d, f"defenses[{i}]") for i, d in enumerate(data))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a native or legacy YAML file, apply `--set` overrides, validate structure."""
    from backdoors.compat import convert_legacy, is_legacy

    data = read_yaml(path)
    if is_legacy(data):
        data = convert_legacy(data, source=str(path))
    return from_dict(apply_overrides(data, overrides or []))
