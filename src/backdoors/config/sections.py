"""The two shapes a config section takes, parsed in one place each.

A component section names a registered class and its keyword arguments
(`{name: krum, byzantine: 1}` or just `krum`); a settings section is a frozen dataclass
(`train`, `federated`) whose fields are its keys. Both report unknown keys with a
did-you-mean and wrong types with the expected type, naming the section.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, TypeVar

from backdoors.errors import ConfigError, did_you_mean
from backdoors.typecheck import matches_type, type_name

S = TypeVar("S")


@dataclass(frozen=True)
class Component:
    """A registered component's name and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.kwargs}


def parse_component(data: Any, where: str) -> Component:
    """`name` or `{name: ..., **kwargs}` -> Component; `where` names the section."""
    if isinstance(data, str):
        return Component(data)
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"section '{where}' needs a 'name' (e.g. {where}: {{name: ...}})")
    if not isinstance(data["name"], str):
        raise ConfigError(f"{where}.name must be a string, got {data['name']!r}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
    return Component(data["name"], {k: v for k, v in data.items() if k != "name"})


def parse_section(cls: type[S], data: Any, where: str,
                  nested: dict[str, Any] | None = None) -> S:
    """Build the settings dataclass `cls` from the mapping `data` (None: all defaults).
    `nested` maps field names to parsers for fields that are not plain values (e.g. a
    component); they receive (value, f"{where}.{field}")."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"section '{where}' must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    hints = inspect.get_annotations(cls, eval_str=True)
    nested = nested or {}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{key}' in {where}{did_you_mean(str(key), names)}; "
                              f"expected one of: {', '.join(sorted(names))}")
        if key in nested:
            values[key] = nested[key](value, f"{where}.{key}")
        elif not matches_type(value, hints[key]):
            raise ConfigError(f"bad value for {where}.{key}: {value!r} is not "
                              f"{type_name(hints[key])}")
        else:
            values[key] = value
    return cls(**values)
