"""Commands that train: train (and --resume), validate, crashtest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from backdoors.errors import BackdoorsError, fail


def train(args: argparse.Namespace) -> int:
    from backdoors.config import load_config
    from backdoors.experiment import Interrupted, resume, run

    try:
        if args.resume:
            if args.config or args.name:
                return fail("--resume takes no config or --name (the run keeps its own)")
            summary = resume(args.resume, quiet=args.quiet, overrides=args.overrides)
        else:
            if not args.config:
                return fail("train needs a CONFIG file (or --resume RUN_DIR)")
            config = load_config(args.config, args.overrides)
            summary = run(config, out=args.out, name=args.name, quiet=args.quiet)
    except Interrupted as stop:
        print(f"interrupted; resume with: backdoors train --resume {stop.run_dir}",
              file=sys.stderr)
        return 130
    print(summary_line(summary))
    return 0


def summary_line(summary: dict[str, Any]) -> str:
    def pct(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None else f"{100 * v:.2f}%"

    return (f"{summary['status']}: clean accuracy {pct('clean_accuracy')}, ASR {pct('asr')}, "
            f"robust accuracy {pct('robust_accuracy')}, backdoor accuracy (all) "
            f"{pct('backdoor_accuracy')} -> {summary['run_dir']}")


def validate(args: argparse.Namespace) -> int:
    from backdoors.assembly.build import build
    from backdoors.config import load_config

    for path in args.files:
        try:
            build(load_config(path, args.overrides))
        except BackdoorsError as exc:  # most messages name the file already
            return fail(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
        print(f"ok: {path}")
    return 0


def crashtest(args: argparse.Namespace) -> int:
    from backdoors.config import load_config
    from backdoors.crashtest import crashtest as run_campaign

    if args.units < 0 or args.instants < 0:
        return fail("--units and --instants must be >= 0")
    config = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/crashtest-{config.name}")
    if out.exists() and any(out.iterdir()):
        return fail(f"--out {out} is not empty; crashtest needs a fresh folder")

    def report(scenario: Any) -> None:
        mark = "held  " if scenario.held else "BROKEN"
        print(f"{mark}  kill {scenario.kill}  {scenario.detail}".rstrip(), flush=True)

    results = run_campaign(config, out, args.units, args.instants, args.seed, report)
    held = sum(r.held for r in results)
    print(f"{held} of {len(results)} killed runs resumed to the uninterrupted result ({out})")
    return 0 if held == len(results) else 1
