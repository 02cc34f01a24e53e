"""Defenses on a finished run: run one (or a config's list) through the runner, record the
result under a key that names its options, and chain defenses on a defended model."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from backdoors.assembly.artifact import reopen
from backdoors.config import Component
from backdoors.defenses import DEFENSES, DefenseTarget, Outcome
from backdoors.defenses.figures import save_artifacts
from backdoors.defenses.runner import run_defense
from backdoors.defenses.scores import format_result
from backdoors.errors import RunError
from backdoors.runs import RunFolder, RunLock, check_finite, load_weights, save_weights, state_of


def defense_key(defense: Component, on: str | None = None) -> str:
    """Where a defense's result lives: defenses/NAME/, or defenses/NAME-<hash>/ when it
    was given options, so results under different options never overwrite each other;
    `ON+KEY` when it ran on the model defense ON made."""
    key = defense.name
    if defense.kwargs:
        text = json.dumps(defense.kwargs, sort_keys=True, default=str)
        key = f"{defense.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return key if on is None else f"{on}+{key}"


def record(folder: RunFolder, defense: Component, outcome: Outcome, key: str) -> None:
    """defenses/KEY/: result.json (with the options), PNG figures, the raw scores and, for
    a defense that made a model, model.safetensors; the result also goes under `defenses`
    in summary.json."""
    figures = {**outcome.figures, "options": defense.kwargs}
    out = folder.path / "defenses" / key
    folder.write_json(f"defenses/{key}/result.json", figures)
    save_artifacts(out, outcome.artifacts, figures)
    vectors = {k: v.detach().cpu().contiguous() for k, v in outcome.artifacts.items()
               if v.dim() == 1}
    if vectors:  # the raw scores, for reports (histograms by poisoned / clean)
        save_weights(out / "scores.safetensors", vectors)
    if outcome.model is not None:
        save_weights(out / "model.safetensors", state_of(outcome.model))
    summary = folder.read_summary()
    summary.setdefault("defenses", {})[key] = figures
    folder.write_summary(summary)


def defended(folder: RunFolder, target: DefenseTarget, on: str) -> DefenseTarget:
    """The target with the model that defense `on` made in place of the attacked one
    (rebuilt by that defense, e.g. with its pruning masks), to chain defenses."""
    made = folder.path / "defenses" / on / "model.safetensors"
    if not made.is_file():
        made_by = (folder.path / "defenses").glob("*/model.safetensors")
        found = sorted(p.parent.name for p in made_by)
        raise RunError(f"--on {on}: {folder.path} has no model made by that defense; models "
                       f"made so far: {', '.join(found) or 'none'}")
    result = folder.read_json(f"defenses/{on}/result.json")
    maker = DEFENSES.build(result["defense"], result.get("options") or {}, f"--on {on}")
    state = load_weights(made)
    check_finite(state, str(made))
    model = maker.restore(copy.deepcopy(target.model), state).to(target.device).eval()
    return dataclasses.replace(target, model=model)


def defend(run_dir: Any, name: str, kwargs: dict[str, Any] | None = None,
           overrides: Sequence[str] = (), on: str | None = None, replace: bool = False
           ) -> dict[str, Any]:
    """Run defense `name` (with constructor `kwargs`) on the completed run in `run_dir`
    (moved by `overrides`, e.g. `task.data_dir=...`), or on the model defense `on` made;
    return its figures. An earlier result under the same key is kept unless `replace`."""
    component = Component(name, dict(kwargs or {}))
    defense = DEFENSES.build(name, component.kwargs, f"defense '{name}'")
    folder = RunFolder.existing(run_dir)
    key = defense_key(component, on)
    if (folder.path / "defenses" / key / "result.json").is_file() and not replace:
        raise RunError(f"{name} already ran on {folder.path} with these options "
                       f"(defenses/{key}/); pass --replace to run it again")
    with RunLock(folder.path, f"running defense {name}"):
        target = reopen(folder, overrides)
        if on is not None:
            target = defended(folder, target, on)
        outcome = run_defense(target, defense)
        if on is not None:
            outcome.figures["on"] = on
        record(folder, component, outcome, key)
    return {**outcome.figures, "options": component.kwargs}


def defend_all(folder: RunFolder, defenses: Sequence[Component], quiet: bool,
               errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Defenses, in order, on the finished run (re-opened once); returns the summary.
    With `errors`, a defense that fails is recorded there (key -> one line) and the others
    still run; without, the failure is raised."""
    with RunLock(folder.path, "running defenses"):
        target = reopen(folder)
        for i, d in enumerate(defenses):
            try:
                defense = DEFENSES.build(d.name, d.kwargs, f"defenses[{i}]")
                outcome = run_defense(target, defense)
                record(folder, d, outcome, defense_key(d))
            except Exception as exc:
                if errors is None:
                    raise
                errors[defense_key(d)] = (str(exc).splitlines() or [type(exc).__name__])[0]
                continue
            if not quiet:
                print(format_result(outcome.figures), flush=True)
    return folder.read_summary()
