"""One generic registry: components are classes (or factories) registered under a short name.

The constructor is the schema: `Registry.check(name, kwargs, where)` validates a config
section against the constructor's signature before anything heavy happens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

from backdoors.errors import ConfigError, did_you_mean
from backdoors.typecheck import constructor_parameters, matches_type, type_hints, type_name

T = TypeVar("T")

# The config path of the component being built, so that a component building others from
# its own options (an aggregator's `inner` rule) names their place in errors.
_BUILDING: ContextVar[str] = ContextVar("building", default="")


def nested(key: str) -> str:
    """The config path of option `key` of the component being built (e.g.
    `federated.aggregator.inner`); `key` alone outside a build."""
    outer = _BUILDING.get()
    return f"{outer}.{key}" if outer else key


class Registry(Generic[T]):
    """A name -> component mapping with signature-checked construction.

    `injected` names constructor arguments the framework supplies itself (for example
    `num_classes` for models); a config may not set them.
    """

    def __init__(self, kind: str, injected: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.injected = injected
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(component: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = component
            component.registry_name = name  # type: ignore[attr-defined]
            return component

        return add

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str, where: str = "") -> Callable[..., T]:
        if not isinstance(name, str) or name not in self._items:
            at = f" at {where}" if where else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}'{at}{did_you_mean(str(name), self._items)}; "
                f"expected one of: {', '.join(self.names())}"
            )
        return self._items[name]

    def describe(self, name: str) -> str:
        """First line of the component's docstring."""
        doc = inspect.getdoc(self._items[name]) or ""
        return doc.splitlines()[0] if doc else ""

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Constructor parameters a config may set (injected ones excluded).

        A constructor that forwards `**kwargs` to its parent also accepts the parent's
        parameters, so subclasses need not repeat the common ones.
        """
        return {k: p for k, p in constructor_parameters(self._items[name]).items()
                if k not in self.injected}

    def check(self, name: str, kwargs: dict[str, Any], where: str) -> None:
        """Raise ConfigError for an unknown name, unknown keyword or missing required one."""
        self.get(name, f"{where}.name")
        params = self.parameters(name)
        for key in kwargs:
            if key not in params:
                raise ConfigError(
                    f"unknown key '{key}' in {self._label(name, where)}"
                    f"{did_you_mean(key, params)}; expected one of: "
                    f"{', '.join(params) or '(no options)'}"
                )
        for key, p in params.items():
            if p.default is inspect.Parameter.empty and key not in kwargs:
                raise ConfigError(f"missing key '{key}' in {self._label(name, where)}")
        hints = type_hints(self._items[name])
        for key, value in kwargs.items():
            if key in hints and not matches_type(value, hints[key]):
                raise ConfigError(
                    f"bad value for {where}.{key}: {value!r} is not {type_name(hints[key])}"
                )

    def build(self, name: str, kwargs: dict[str, Any], where: str, **injected: Any) -> T:
        self.check(name, kwargs, where)
        token = _BUILDING.set(where)
        try:
            return self._items[name](**kwargs, **injected)
        except ValueError as exc:
            raise ConfigError(f"{self._label(name, where)}: {exc}") from None
        finally:
            _BUILDING.reset(token)

    def _label(self, name: str, where: str) -> str:
        """`where (kind 'name')`, without saying the name twice when `where` has it."""
        return where if f"'{name}'" in where else f"{where} ({self.kind} '{name}')"
