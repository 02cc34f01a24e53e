"""Registry lookup, config checking against constructor signatures, and type names."""

from __future__ import annotations

import collections.abc
import typing
from typing import Any, Literal, Optional

import pytest

from backdoors.errors import ConfigError, did_you_mean
from backdoors.registry import Registry
from backdoors.typecheck import matches_type, type_name

TASKS: Registry[object] = Registry("task")
WIDGETS: Registry[object] = Registry("widget", injected=("num_classes",))


@TASKS.register("mnist")
class Mnist:
    """Handwritten digits.

    More text that `describe` leaves out.
    """


@TASKS.register("cifar10")
class Cifar10:
    pass


@WIDGETS.register("gadget")
class Gadget:
    """A component with one option of each kind a config can hold."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        rate: float = 0.1,
        steps: int = 3,
        flag: bool = False,
        tags: list[str] | None = None,
        limit: Optional[int] = None,  # noqa: UP045 - the typing spelling must work too
        mode: Literal["fast", "slow"] = "fast",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.name, self.num_classes, self.rate, self.steps = name, num_classes, rate, steps


def test_register_and_get_return_the_component() -> None:
    assert TASKS.get("mnist") is Mnist
    assert Mnist.registry_name == "mnist"  # type: ignore[attr-defined]
    assert "cifar10" in TASKS and "svhn" not in TASKS
    assert TASKS.names() == ["cifar10", "mnist"] == list(TASKS)
    assert len(TASKS) == 2


def test_describe_returns_the_first_docstring_line() -> None:
    assert TASKS.describe("mnist") == "Handwritten digits."
    assert TASKS.describe("cifar10") == ""


def test_unknown_name_suggests_the_closest_one_and_lists_all() -> None:
    with pytest.raises(ConfigError) as err:
        TASKS.get("mnistt", "task.name")
    message = str(err.value)
    assert "unknown task 'mnistt' at task.name" in message
    assert "(did you mean 'mnist'?)" in message
    assert "expected one of: cifar10, mnist" in message


def test_unknown_name_far_from_every_choice_gets_no_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        TASKS.get("imagenet")
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("name", [None, 5, ["mnist"]])
def test_non_string_name_is_a_config_error(name: object) -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        TASKS.get(name)  # type: ignore[arg-type]


def test_registering_a_name_twice_raises() -> None:
    registry: Registry[object] = Registry("thing")
    registry.register("a")(Mnist)
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        registry.register("a")(Cifar10)
    assert registry.get("a") is Mnist


def test_parameters_exclude_injected_self_and_variadic_arguments() -> None:
    assert list(WIDGETS.parameters("gadget")) == [
        "name", "rate", "steps", "flag", "tags", "limit", "mode",
    ]


def test_check_accepts_a_valid_config() -> None:
    kwargs = {"name": "x", "rate": 1, "steps": 2, "tags": ["a"], "limit": None, "mode": "slow"}
    WIDGETS.check("gadget", kwargs, "attack.widget")


def test_check_rejects_unknown_key_naming_it_and_suggesting_a_close_one() -> None:
    with pytest.raises(ConfigError) as err:
        WIDGETS.check("gadget", {"name": "x", "rat": 0.5}, "attack.widget")
    message = str(err.value)
    assert "unknown key 'rat' in attack.widget (widget 'gadget')" in message
    assert "(did you mean 'rate'?)" in message


def test_check_rejects_injected_arguments_set_by_the_config() -> None:
    with pytest.raises(ConfigError, match="unknown key 'num_classes'"):
        WIDGETS.check("gadget", {"name": "x", "num_classes": 3}, "attack.widget")


def test_check_rejects_a_missing_required_key() -> None:
    with pytest.raises(ConfigError) as err:
        WIDGETS.check("gadget", {"rate": 0.5}, "attack.widget")
    assert str(err.value) == "missing key 'name' in attack.widget (widget 'gadget')"


def test_check_rejects_unknown_component_with_the_name_path() -> None:
    with pytest.raises(ConfigError, match="unknown widget 'gadgt' at attack.widget.name"):
        WIDGETS.check("gadgt", {}, "attack.widget")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("name", 3, "a string"),
        ("rate", "0.5", "a finite number"),
        ("rate", float("nan"), "a finite number"),
        ("rate", True, "a finite number"),
        ("steps", True, "an integer"),
        ("steps", 2.0, "an integer"),
        ("flag", 1, "true/false"),
        ("tags", "a", "a list or null"),
        ("tags", ["a", 2], "a list or null"),
        ("limit", "3", "an integer or null"),
        ("mode", "medium", "one of 'fast', 'slow'"),
    ],
)
def test_check_rejects_values_of_the_wrong_type(key: str, value: object, expected: str) -> None:
    kwargs = {"name": "x", key: value}
    with pytest.raises(ConfigError) as err:
        WIDGETS.check("gadget", kwargs, "attack.widget")
    assert str(err.value) == f"bad value for attack.widget.{key}: {value!r} is not {expected}"


def test_build_constructs_with_injected_arguments() -> None:
    gadget = WIDGETS.build("gadget", {"name": "x", "rate": 2}, "attack.widget", num_classes=7)
    assert isinstance(gadget, Gadget)
    assert (gadget.name, gadget.num_classes, gadget.rate) == ("x", 7, 2)


def test_build_wraps_constructor_value_errors_with_the_section_path() -> None:
    with pytest.raises(ConfigError) as err:
        WIDGETS.build("gadget", {"name": "x", "steps": -1}, "attack.widget", num_classes=7)
    assert str(err.value) == "attack.widget (widget 'gadget'): steps must be >= 0, got -1"


@pytest.mark.parametrize(
    ("value", "hint", "ok"),
    [
        (1, float, True),
        (1.5, int, False),
        (False, int, False),
        (None, int | None, True),
        (None, int, False),
        ([1, 2.5], list[float], True),
        ([1, "a"], list[float], False),
        ((1, 2), tuple[int, int], True),
        ([1, 2, 3], tuple[int, int], False),
        ([1, 2, 3], tuple[int, ...], True),
        ({"a": 1.0}, dict[str, float], True),
        ({1: 1.0}, dict[str, float], False),
        ("b", Literal["a", "b"], True),
        ("c", Literal["a", "b"], False),
        (object(), Any, True),
    ],
)
def test_matches_type(value: object, hint: object, ok: bool) -> None:
    assert matches_type(value, hint) is ok


def test_bool_does_not_match_a_literal_of_ints() -> None:
    assert not matches_type(True, Literal[1, 2])


@pytest.mark.parametrize("hint", [typing.Sequence[int], collections.abc.Sequence[int]])
def test_sequence_hints_are_checked(hint: object) -> None:
    assert matches_type([1, 2], hint)
    assert not matches_type(5, hint)


@pytest.mark.parametrize(
    ("hint", "name"),
    [
        (int, "an integer"),
        (float, "a finite number"),
        (bool, "true/false"),
        (str, "a string"),
        (type(None), "null"),
        (int | None, "an integer or null"),
        (list[int], "a list"),
        (tuple[int, int], "a list"),
        (dict[str, float], "a mapping"),
        (Literal["l2", "loss"], "one of 'l2', 'loss'"),
        (Gadget, "Gadget"),
    ],
)
def test_type_name_is_readable(hint: object, name: str) -> None:
    assert type_name(hint) == name


def test_did_you_mean() -> None:
    assert did_you_mean("mnistt", ["mnist", "cifar10"]) == " (did you mean 'mnist'?)"
    assert did_you_mean("zzz", ["mnist", "cifar10"]) == ""
