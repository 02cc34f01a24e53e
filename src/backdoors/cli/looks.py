"""Commands that look at components and runs: list, show, defend, gallery."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from backdoors.errors import fail
from backdoors.registry import Registry
from backdoors.typecheck import type_hints, type_name


def _registry(what: str) -> Registry[Any]:
    import backdoors.attacks as attacks
    from backdoors.data import TASKS
    from backdoors.defenses import DEFENSES
    from backdoors.federated import AGGREGATORS, ATTACKERS
    from backdoors.models import MODELS
    from backdoors.synthesizers import SYNTHESIZERS

    return {"tasks": TASKS, "models": MODELS, "synthesizers": SYNTHESIZERS,
            "attacks": attacks.ATTACKS, "balancers": attacks.BALANCERS,
            "loss_terms": attacks.LOSS_TERMS, "defenses": DEFENSES,
            "aggregators": AGGREGATORS, "attackers": ATTACKERS}[what]


def list_components(args: argparse.Namespace) -> int:
    registry = _registry(args.what)
    if args.name is not None:
        print(describe(registry, args.name))
        return 0
    if not registry.names():
        print(f"(no {args.what} registered)")
        return 0
    width = max(len(n) for n in registry.names())
    for name in registry.names():
        print(f"{name:<{width}}  {registry.describe(name)}")
    return 0


def describe(registry: Registry[Any], name: str) -> str:
    """A component's docstring and a table of its options: name, type, default."""
    component = registry.get(name)
    hints = type_hints(component)
    rows = [(key, type_name(hints[key]) if key in hints else "",
             "(required)" if p.default is inspect.Parameter.empty else repr(p.default))
            for key, p in registry.parameters(name).items()]
    widths = [max(len(r[i]) for r in [("option", "type", "default"), *rows]) for i in range(3)]
    table = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip()
             for a, b, c in [("option", "type", "default"), *rows]]
    doc = inspect.getdoc(component) or "(no description)"
    return f"{registry.kind} '{name}'\n\n{doc}\n\n" + "\n".join(table or ["(no options)"])


def show(args: argparse.Namespace) -> int:
    from backdoors.report.show import show_table
    from backdoors.runs import RunFolder, is_locked

    if not args.json:
        print(show_table(args.run_dirs))
        return 0
    for path in args.run_dirs:
        folder = RunFolder.existing(path)
        summary = folder.read_summary()
        if not summary:
            return fail(f"{folder.path} has no summary.json yet (its run has not started)")
        print(json.dumps(summary, indent=2))
        if summary.get("status") == "running" and not is_locked(folder.path):
            print(f"note: no process is running {folder.path} (it was killed); resume with: "
                  f"backdoors train --resume {folder.path}", file=sys.stderr)
    return 0


def defend(args: argparse.Namespace) -> int:
    """Flat --set keys are defense options; dotted ones move the run (task.data_dir=...)."""
    from backdoors.assembly.defending import defend as run_defense
    from backdoors.config import parse_override
    from backdoors.defenses.scores import format_result

    kwargs, moves = {}, []
    for text in args.overrides:
        keys, value = parse_override(text)
        if len(keys) == 1:
            kwargs[keys[0]] = value
        else:
            moves.append(text)
    print(format_result(run_defense(args.run_dir, args.defense, kwargs, moves, args.on,
                                    args.replace)))
    return 0


def gallery(args: argparse.Namespace) -> int:
    from backdoors.config import load_config
    from backdoors.gallery import draw_gallery, draw_predictions

    if args.n < 1:
        return fail(f"--n must be >= 1, got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        return fail(f"--out must name a .png file, got {out}")
    if Path(args.config).is_dir():  # a trained run: draw what its model predicts
        if args.overrides:
            return fail("gallery RUN_DIR takes no --set (the run keeps its config)")
        print(f"wrote {draw_predictions(args.config, out, args.n)}")
        return 0
    print(f"wrote {draw_gallery(load_config(args.config, args.overrides), out, args.n)}")
    return 0
