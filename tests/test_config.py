"""Config loading: sections, defaults, overrides, types, and every shipped config."""

from __future__ import annotations

import pytest
import yaml

from backdoors.assembly.build import build
from backdoors.config import apply_overrides, from_dict, load_config, parse_override
from backdoors.errors import ConfigError


def test_defaults_fill_missing_sections():
    cfg = from_dict({"task": "digits"})
    assert cfg.attack.name == "blind" and cfg.synthesizer.name == "pattern"
    assert cfg.train.epochs == 10 and cfg.model is None


def test_config_is_frozen():
    cfg = from_dict({"task": "digits"})
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_parse_override_types():
    assert parse_override("train.lr=0.1") == (["train", "lr"], 0.1)
    assert parse_override("train.milestones=[1, 2]") == (["train", "milestones"], [1, 2])
    assert parse_override("train.tensorboard=false") == (["train", "tensorboard"], False)
    assert parse_override("task.data_dir=/x/y") == (["task", "data_dir"], "/x/y")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_overrides_do_not_mutate_input_and_expand_component_shorthand():
    data = {"task": "digits", "attack": "blind"}
    out = apply_overrides(data, ["attack.balancer.normalize=l2", "task.augment=true"])
    assert data == {"task": "digits", "attack": "blind"}
    assert out["attack"] == {"name": "blind", "balancer": {"normalize": "l2"}}
    assert out["task"] == {"name": "digits", "augment": True}


@pytest.mark.parametrize("data, needle", [
    ({"task": "digits", "trainn": {}}, "did you mean 'train'"),
    ({"task": "digits", "train": {"epoch": 3}}, "did you mean 'epochs'"),
    ({"task": "digits", "train": {"epochs": "3"}}, "train.epochs"),
    ({"task": "digits", "train": {"epochs": 0}}, "train.epochs must be >= 1"),
    ({"task": "digits", "train": {"optimizer": "sgdd"}}, "train.optimizer"),
    ({"task": "digits", "train": {"device": "gpu"}}, "train.device"),
    ({"task": "digits", "seed": 1.5}, "seed"),
    ({"train": {}}, "missing section 'task'"),
    ({"task": {"data_dir": "x"}}, "needs a 'name'"),
])
def test_structural_errors(data, needle):
    with pytest.raises(ConfigError, match=None) as info:
        from_dict(data)
    assert needle in str(info.value)


@pytest.mark.parametrize("data, needle", [
    ({"task": "digitz"}, "did you mean 'digits'"),
    ({"task": {"name": "digits", "test_fraction": "x"}}, "task.test_fraction"),
    ({"task": "digits", "synthesizer": {"name": "pattern", "target": 12}}, "not a class"),
    ({"task": "digits", "synthesizer": {"name": "pattern", "position": [6, 6]}}, "does not fit"),
    ({"task": "digits", "attack": {"name": "data", "ratio": 2.0}}, "ratio"),
    ({"task": "digits", "attack": {"name": "blind", "balancer": "mgdaa"}}, "did you mean 'mgda'"),
    ({"task": "digits", "attack": {"name": "blind", "loss_terms": ["backdoor"]}}, "normal"),
    ({"task": "digits", "model": {"name": "tiny_cnn", "num_classes": 3}}, "num_classes"),
])
def test_component_errors(data, needle):
    with pytest.raises(ConfigError) as info:
        build(from_dict(data))
    assert needle in str(info.value)


def test_load_config_reports_yaml_syntax_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: {name: digits\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("task: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    from backdoors.assembly.build import resolved_config

    cfg = from_dict({"task": "digits", "train": {"epochs": 2}})
    resolved = resolved_config(cfg, build(cfg))
    again = from_dict(yaml.safe_load(yaml.safe_dump(resolved)))
    assert again.train == cfg.train and again.task.kwargs["test_fraction"] == 0.25
