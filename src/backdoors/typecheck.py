"""Check config values (plain YAML data) against constructor type hints."""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def _init_chain(component: Any) -> list[Any]:
    """The constructors whose parameters a component accepts: its own, then its parents'
    for as long as each forwards **kwargs. A plain function is its own chain."""
    if not inspect.isclass(component):
        return [component]
    chain = []
    for cls in component.__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        chain.append(cls.__init__)
        kinds = [p.kind for p in inspect.signature(cls.__init__).parameters.values()]
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            break
    return chain


def constructor_parameters(component: Any) -> dict[str, inspect.Parameter]:
    """Named keyword parameters of a component's constructor chain (child first)."""
    params: dict[str, inspect.Parameter] = {}
    for init in _init_chain(component):
        for key, p in inspect.signature(init).parameters.items():
            if key != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(key, p)
    return params


def type_hints(component: Any) -> dict[str, Any]:
    """Type hints of a component's constructor chain; {} where they cannot be resolved."""
    hints: dict[str, Any] = {}
    for init in reversed(_init_chain(component)):
        try:
            hints.update(typing.get_type_hints(init))
        except Exception:  # noqa: BLE001 - unresolved forward references: skip type checks
            continue
    return hints


def matches_type(value: Any, hint: Any) -> bool:
    """True when a YAML-shaped value fits the hint. Ints are accepted for floats."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(matches_type(value, h) for h in get_args(hint))
    if origin is Literal:
        # `True == 1` in Python: compare types too, so a bool never matches Literal[1].
        return any(value == a and type(value) is type(a) for a in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        # nan and inf are never meant in a config: a learning rate of .nan trains nothing.
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = get_args(hint)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(args) == len(value) and all(map(matches_type, value, args))
        return all(matches_type(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        args = get_args(hint)
        return not args or all(
            matches_type(k, args[0]) and matches_type(v, args[1]) for k, v in value.items()
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def type_name(hint: Any) -> str:
    """A readable name for a type hint, as used in error messages."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(h) for h in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return {list: "a list", tuple: "a list", dict: "a mapping"}.get(origin, str(hint))
    names = {int: "an integer", float: "a finite number", bool: "true/false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
