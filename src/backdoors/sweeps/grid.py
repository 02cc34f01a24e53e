"""Grid files: a base config, axes, named cases, seeds and defenses -> the cells of a sweep.

    name: demo                          # the sweep folder: OUT/demo
    base: configs/quickstart.yaml       # any native or Backdoors 101 config
    set: {train.epochs: 4}              # overrides for every cell (optional)
    grid:                               # dotted keys -> lists: their cartesian product
      synthesizer.name: [pattern, blend]
      attack.name: [batch, blind]
    cases:                              # named variants, crossed with the grid (optional)
      - {name: badnets, set: {attack: {name: data, ratio: 0.1}}}
    seeds: [1, 2, 3]
    defenses: [strip, {name: fine_pruning, epochs: 2}]
    retries: 1                          # extra attempts of a failed cell per launch
    resources: {cpus_per_cell: 1, gpus_per_cell: 0}
    reference: {dataset: cifar10, model: preactresnet18, poison_ratio: 0.1}

Every key of a cell's config can be an axis or a case override (task, model, train.*,
attack options...). Parsing checks the grid's own structure; `cells` then builds every
cell's components, so a bad value in any cell is one line before anything runs.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backdoors.config import Component, native_data, parse_component, read_yaml, set_dotted
from backdoors.errors import ConfigError, did_you_mean

KEYS = ("name", "base", "set", "grid", "cases", "seeds", "defenses", "retries", "resources")
RESOURCES = ("cpus_per_cell", "gpus_per_cell")
MAX_SEED = 2**32


@dataclass(frozen=True)
class Case:
    """A named variant: overrides (dotted keys or nested mappings) on top of the grid."""

    name: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Grid:
    """A parsed grid file (see the module docstring)."""

    path: Path
    name: str
    base: Path
    overrides: dict[str, Any]
    axes: dict[str, list[Any]]
    cases: tuple[Case, ...]
    seeds: tuple[int, ...]
    defenses: tuple[Component, ...]
    retries: int = 1
    cpus_per_cell: int | None = None
    gpus_per_cell: float = 0.0

    def base_data(self) -> dict[str, Any]:
        """The base config as a native mapping (legacy files converted)."""
        data = native_data(self.base)
        data.pop("defenses", None)  # the sweep runs defenses once per finished attack
        return data


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file; ConfigError (one line, naming the key) when it is
    malformed."""
    p = Path(path)
    data = read_yaml(p)
    for key in data:
        if key not in KEYS:
            raise ConfigError(f"{p}: unknown key '{key}'{did_you_mean(str(key), KEYS)}; "
                              f"expected: {', '.join(KEYS)}")
    for key in ("name", "base"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{p}: '{key}' must be a non-empty string, e.g. "
                              f"{'name: demo' if key == 'name' else 'base: configs/x.yaml'}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", data["name"]):
        raise ConfigError(f"{p}: name must be a plain folder name, got {data['name']!r}")
    resources = _mapping(data.get("resources"), f"{p}: resources")
    for key in resources:
        if key not in RESOURCES:
            raise ConfigError(f"{p}: unknown key '{key}' in resources"
                              f"{did_you_mean(str(key), RESOURCES)}; expected one of: "
                              f"{', '.join(RESOURCES)}")
    return Grid(
        path=p, name=data["name"], base=_base(p, data["base"]),
        overrides=_mapping(data.get("set"), f"{p}: set"),
        axes=_axes(data.get("grid"), p), cases=_cases(data.get("cases"), p),
        seeds=_seeds(data.get("seeds", [0]), p), defenses=_defenses(data.get("defenses"), p),
        retries=_count(data.get("retries", 1), f"{p}: retries"),
        cpus_per_cell=None if resources.get("cpus_per_cell") is None
        else max(1, _count(resources["cpus_per_cell"], f"{p}: resources.cpus_per_cell")),
        gpus_per_cell=_gpus(resources.get("gpus_per_cell", 0), p),
    )


def _base(grid: Path, text: str) -> Path:
    """The base config: relative to the working directory, else to the grid file."""
    for candidate in (Path(text).expanduser(), grid.parent / text):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{grid}: base config not found: {text} (looked in the working "
                      f"directory and in {grid.parent})")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{where} must be a mapping of keys to values")
    return dict(value)


def _axes(value: Any, grid: Path) -> dict[str, list[Any]]:
    axes = _mapping(value, f"{grid}: grid")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{grid}: grid.{key} must be a non-empty list of values, got "
                              f"{values!r}")
        if not all(key.split(".")):
            raise ConfigError(f"{grid}: grid key '{key}' is not a dotted config key")
    return axes


def _cases(value: Any, grid: Path) -> tuple[Case, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{grid}: cases must be a non-empty list of {{name: ..., set: "
                          "{...}}")
    out, seen = [], set()
    for i, item in enumerate(value):
        where = f"{grid}: cases[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where} needs a 'name' (e.g. {{name: badnets, set: {{...}}}})")
        extra = set(item) - {"name", "set"}
        if extra:
            raise ConfigError(f"{where}: unknown key '{sorted(extra)[0]}'; expected name, set")
        if item["name"] in seen:
            raise ConfigError(f"{where}: case '{item['name']}' appears twice")
        seen.add(item["name"])
        out.append(Case(item["name"], _mapping(item.get("set"), f"{where}.set")))
    return tuple(out)


def _seeds(value: Any, grid: Path) -> tuple[int, ...]:
    ok = isinstance(value, list) and value and all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s < MAX_SEED for s in value)
    if not ok or len(set(value)) != len(value):
        raise ConfigError(f"{grid}: seeds must be a list of distinct integers in [0, 2^32), "
                          f"got {value!r}")
    return tuple(value)


def _defenses(value: Any, grid: Path) -> tuple[Component, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{grid}: defenses must be a list, e.g. [strip, {{name: "
                          "fine_pruning}]")
    return tuple(parse_component(d, f"defenses[{i}]") for i, d in enumerate(value))


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} must be an integer >= 0, got {value!r}")
    return value


def _gpus(value: Any, grid: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{grid}: resources.gpus_per_cell must be a number >= 0 (fractions "
                          f"share a GPU), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Point:
    """One cell before validation: its row label, axis values, case and seed, and the
    native config mapping it trains."""

    label: str
    axes: dict[str, Any]
    case: str | None
    seed: int
    data: dict[str, Any]


def points(grid: Grid) -> list[Point]:
    """Every combination of the axes, cases and seeds, with its config mapping."""
    base = grid.base_data()
    keys = list(grid.axes)
    out = []
    for combo in itertools.product(*grid.axes.values()):
        for case in grid.cases or (None,):
            axes = dict(zip(keys, combo, strict=True))
            label = "-".join([*(short(v) for v in combo), *([case.name] if case else [])])
            for seed in grid.seeds:
                data = _with(base, grid.overrides, f"{grid.path}: set")
                data = _with(data, axes, f"{grid.path}: grid")
                if case is not None:
                    data = _with(data, case.overrides, f"{grid.path}: case '{case.name}'")
                data["seed"] = seed
                out.append(Point(label or grid.name, axes, case.name if case else None, seed,
                                 data))
    return out


def _with(data: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of `data` with dotted-key overrides set; a nested mapping sets a section."""
    import copy

    out = copy.deepcopy(data)
    for key, value in overrides.items():
        set_dotted(out, key.split("."), copy.deepcopy(value), f"{where}: {key}")
    return out


def short(value: Any) -> str:
    """A compact text of an axis value for row labels: names of components, values of
    scalars."""
    if isinstance(value, dict):
        name = value.get("name")
        rest = ",".join(f"{k}={short(v)}" for k, v in value.items() if k != "name")
        return f"{name}({rest})" if name and rest else str(name or rest)
    if isinstance(value, list):
        return "[" + ",".join(short(v) for v in value) + "]"
    return str(value)
