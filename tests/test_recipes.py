"""docs/extending.md's recipes: each code block runs as written, registers its component,
and the component works in a real run."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backdoors.assembly.defending import defend
from backdoors.config import from_dict
from backdoors.data import TASKS
from backdoors.defenses import DEFENSES
from backdoors.experiment import run
from backdoors.federated import AGGREGATORS
from backdoors.models import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")
DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
RECIPES = dict(re.findall(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", DOC.read_text(),
                          re.S))


@pytest.fixture
def recipe(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run the recipe named by the test's parameter; unregister what it added."""
    name, registry, component = request.param
    exec(compile(RECIPES[name], f"docs/extending.md ({name})", "exec"), {})
    try:
        yield
    finally:
        registry._items.pop(component, None)


def test_every_recipe_is_tested():
    assert set(RECIPES) == {"defense", "aggregator", "task", "model"}


@pytest.mark.parametrize("recipe", [("defense", DEFENSES, "max_confidence")], indirect=True)
def test_the_defense_recipe_runs_on_a_finished_attack(recipe, tiny, tmp_path):
    tiny["attack"] = {"name": "data", "ratio": 0.1}
    summary = run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    assert summary["asr"] > 0.9
    result = defend(tmp_path / "r", "max_confidence", {"temperature": 2.0})
    assert result["stage"] == "input" and 0.0 <= result["auroc"] <= 1.0
    # Non-default options give the result folder a key of its own: name-<options hash>.
    assert len(list((tmp_path / "r" / "defenses").glob("max_confidence-*/result.json"))) == 1


@pytest.mark.parametrize("recipe", [("aggregator", AGGREGATORS, "drop_largest")],
                         indirect=True)
def test_the_aggregator_recipe_flags_the_boosted_attacker(recipe, tiny, tmp_path):
    tiny["attack"] = {"name": "batch", "fraction": 0.5}
    tiny["federated"] = {"rounds": 2, "participants": 4, "per_round": 4, "local_epochs": 1,
                         "adversaries": 1, "weight_scale": 20.0,
                         "aggregator": {"name": "drop_largest"}}
    summary = run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    assert summary["status"] == "completed" and summary["aggregator"] == "drop_largest"
    assert summary["detection"]["recall"] == 1.0  # the boosted update is the largest
    bad = copy.deepcopy(tiny)
    bad["federated"]["aggregator"] = {"name": "drop_largest", "drop": 4}
    with pytest.raises(Exception, match="must be below per_round"):
        run(from_dict(bad), out=tmp_path, name="bad", quiet=True)


@pytest.mark.parametrize("recipe", [("task", TASKS, "stripes")], indirect=True)
def test_the_task_recipe_trains_and_carries_a_backdoor(recipe, tiny, tmp_path):
    tiny["task"] = {"name": "stripes", "size": 512}
    tiny["train"]["epochs"] = 6
    tiny["attack"] = {"name": "data", "ratio": 0.1}
    tiny["synthesizer"] = {"name": "pattern", "target": 1}
    summary = run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    assert summary["clean_accuracy"] > 0.9 and summary["asr"] > 0.9, summary


@pytest.mark.parametrize("recipe", [("model", MODELS, "small_conv")], indirect=True)
def test_the_model_recipe_trains_and_is_defended(recipe, tiny, tmp_path):
    tiny["model"] = {"name": "small_conv", "width": 8}
    tiny["attack"] = {"name": "data", "ratio": 0.1}
    summary: dict[str, Any] = run(from_dict(tiny), out=tmp_path, name="r", quiet=True)
    assert summary["clean_accuracy"] > 0.8, summary
    result = defend(tmp_path / "r", "fine_pruning", {"epochs": 1})
    assert "after" in result and result["pruned_neurons"] >= 0
