"""YAML loading: the safe loader (config text is never executed) with YAML 1.2 numbers.

PyYAML follows YAML 1.1, where a float needs a dot, so `lr: 1e-3` or `--set
train.lr=5e-2` is the string "1e-3" and `010` is the octal 8. Researchers write learning
rates like that every day; YAML 1.2's core schema (what JSON and most YAML libraries
read) makes them numbers. Booleans keep YAML 1.1's spellings (yes/no/on/off).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
FLOAT_12 = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class Loader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 integers and floats."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (INT_TAG, FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(INT_TAG, INT_12, list("-+0123456789"))
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT_12, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)  # "010" is ten in YAML 1.2, not the octal eight


Loader.add_constructor(INT_TAG, _construct_int)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely with YAML 1.2 numbers (yaml.YAMLError on bad syntax)."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass
