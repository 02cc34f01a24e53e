"""Native configuration: YAML sections, dotted overrides, validation with did-you-mean.

A config has sections `name, seed, task, model, train, synthesizer, attack, defenses` and
the optional `federated` (config/federated.py). Components (task, model, synthesizer,
attack, each defense) are `{name: ..., **kwargs}` checked against their constructor's
signature when the run is built; `train` and `federated` are frozen dataclasses. Legacy
Backdoors 101 flat files are detected and converted by config/compat.py. Config objects
are frozen.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backdoors.config.compat import convert_legacy, is_legacy
from backdoors.config.federated import FederatedConfig, check_federated_train, parse_federated
from backdoors.config.legacy_keys import NATIVE_KEYS, legacy_error
from backdoors.config.sections import Component, parse_component, parse_section
from backdoors.config.train import TrainConfig
from backdoors.config.yaml12 import load_yaml
from backdoors.errors import ConfigError, did_you_mean

SECTIONS = ("name", "seed", "task", "model", "train", "synthesizer", "attack", "defenses",
            "federated")
COMPONENTS = ("task", "model", "synthesizer", "attack")
MAX_SEED = 2**32  # every derived stream seed must fit torch's 64-bit seed (seeds.py)
# A run name becomes a folder name inside --out: no separators, no "..", nothing hidden.
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,127}$")


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
    # A Backdoors 101 flat file this config was converted from, so that errors found
    # later (when components are built) can name the keys the user wrote.
    legacy_source: str | None = field(default=None, compare=False)

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


def check_run_name(name: Any, where: str) -> str:
    """A run name that stays a plain folder inside --out."""
    if not isinstance(name, str) or not RUN_NAME.match(name) or ".." in name:
        raise ConfigError(f"{where} must be a plain folder name (letters, digits, '_', '-', "
                          f"'.', '+', '='; no '/', no '..', not starting with '.'), got "
                          f"{name!r}")
    return name


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping (safe loader, YAML 1.2 numbers)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder; expected a YAML config file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); save the config as "
                          "UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError(f"{p}{where}: not valid YAML ({problem})") from None
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
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with each `key.sub=value` set (intermediate mappings created)."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(out, parts, value, f"--set {text}")
    return out


def set_dotted(data: dict[str, Any], parts: list[str], value: Any, where: str) -> None:
    """Set data[parts[0]][parts[1]]... = value in place, creating mappings on the way (a
    component given by name, `attack: blind`, becomes `{name: blind}`)."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part in COMPONENTS:
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a native config mapping (structure and types; components by name)."""
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"unknown section '{key}'{_section_hint(str(key))}; "
                              f"expected: {', '.join(SECTIONS)}")
    if "task" not in data:
        raise ConfigError("missing section 'task' (e.g. task: {name: digits})")
    merged = {**DEFAULTS, **data}
    if not isinstance(merged["name"], str) or not merged["name"]:
        raise ConfigError(f"name must be a non-empty string, got {merged['name']!r}")
    check_run_name(merged["name"], "name")
    seed = merged["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    train = parse_section(TrainConfig, merged.get("train"), "train")
    federated = parse_federated(merged.get("federated"))
    if federated is not None:
        check_federated_train(train)
    return Config(
        name=merged["name"],
        seed=seed,
        task=parse_component(merged["task"], "task"),
        model=None if merged["model"] is None else parse_component(merged["model"], "model"),
        train=train,
        synthesizer=parse_component(merged["synthesizer"], "synthesizer"),
        attack=parse_component(merged["attack"], "attack"),
        defenses=_defenses(merged.get("defenses")),
        federated=federated,
    )


def _section_hint(key: str) -> str:
    """A did-you-mean for an unknown section: a section name, a train option given at the
    top level (`epochs` for `train.epochs`), or a Backdoors 101 key's native name."""
    near = did_you_mean(key, SECTIONS)
    if near:
        return near
    if key in {f.name for f in dataclasses.fields(TrainConfig)}:
        return f" (did you mean 'train.{key}'?)"
    native = NATIVE_KEYS.get(key)
    return f" (the Backdoors 101 key '{key}' is '{native}' here)" if native else ""


def _defenses(data: Any) -> tuple[Component, ...]:
    """`defenses:` is a list of components run, in order, after training."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError("section 'defenses' must be a list, e.g. defenses: [strip, "
                          "{name: fine_pruning}]")
    return tuple(parse_component(d, f"defenses[{i}]") for i, d in enumerate(data))


def native_data(path: str | Path) -> dict[str, Any]:
    """A native or legacy YAML file as a native config mapping (not yet validated)."""
    data = read_yaml(path)
    return convert_legacy(data, source=str(path)) if is_legacy(data) else data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a native or legacy YAML file, apply `--set` overrides, validate structure."""
    legacy = is_legacy(read_yaml(path))
    try:
        config = from_dict(apply_overrides(native_data(path), overrides or []))
    except ConfigError as exc:
        raise (legacy_error(exc) if legacy else exc) from None
    return dataclasses.replace(config, legacy_source=str(path)) if legacy else config
