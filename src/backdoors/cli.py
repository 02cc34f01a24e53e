"""The `backdoors` command: train, validate, list, show, defend, gallery.

Usage, config, data and run-folder errors print one line on stderr and exit with code 2;
a run that failed (diverged, say) prints one line and exits with 1; an interrupted run
exits with 130. Never a traceback (set BACKDOORS_DEBUG=1 to see one for an unexpected
error).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backdoors.errors import BackdoorsError, fail, report
from backdoors.version import __version__

LISTABLE = ("tasks", "models", "synthesizers", "attacks", "balancers", "loss_terms",
            "defenses", "aggregators")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(fail(f"{self.prog}: {message}"))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="backdoors", description="Backdoor attacks and defenses for deep learning.")
    p.add_argument("--version", action="version", version=f"backdoors {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model under attack (or resume a run)")
    t.add_argument("config", nargs="?", help="YAML config (native or Backdoors 101 flat file)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.1 (repeatable)")
    t.add_argument("--out", default="runs", help="parent folder of run folders (default runs/)")
    t.add_argument("--name", help="run folder name (must not exist); default NAME-TIMESTAMP")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")

    v = sub.add_parser("validate", help="check config files without loading data")
    v.add_argument("files", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ls = sub.add_parser("list", help="list registered components")
    ls.add_argument("what", choices=LISTABLE)

    s = sub.add_parser("show", help="a compact table of runs (or sweep cells)")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--json", action="store_true", help="print each run's summary.json")

    d = sub.add_parser("defend", help="run a defense on a finished attack run")
    d.add_argument("run_dir")
    d.add_argument("--defense", required=True, help="defense name (backdoors list defenses)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="defense option, e.g. --set clean_fraction=0.1 (repeatable)")

    c = sub.add_parser("crashtest", help="kill a config's run at every write and at random "
                       "instants; check each resume ends exactly as an uninterrupted run")
    c.add_argument("config")
    c.add_argument("--out", help="work folder (default runs/crashtest-NAME)")
    c.add_argument("--units", type=int, default=3,
                   help="kill after every write of the first N epochs/rounds (default 3)")
    c.add_argument("--instants", type=int, default=30,
                   help="also kill at N random instants (default 30)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random instants")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    w = sub.add_parser("sweep", help="run a grid of attacks x defenses x seeds, resumably")
    w.add_argument("grid", help="grid file (see docs/sweeps.md)")
    w.add_argument("--out", default="runs", help="parent of the sweep folder (default runs/)")
    w.add_argument("--engine", default="local", help="local (a process pool) or ray")
    w.add_argument("--workers", type=int, default=None,
                   help="local pool size (default: one per GPU, else 1)")
    w.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    w.add_argument("--quiet", action="store_true", help="no progress lines")

    r = sub.add_parser("report", help="tables and figures over sweeps or run folders")
    r.add_argument("paths", nargs="+", help="sweep folders, run folders, or folders of them")
    r.add_argument("--out", default=None, help="report file (suffix replaced per format)")
    r.add_argument("--format", default="html,md", help="comma-separated: html, md, csv")

    g = sub.add_parser("gallery", help="draw clean vs triggered test images to a PNG")
    g.add_argument("config")
    g.add_argument("--out", required=True, help="PNG file to write")
    g.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _train(args: argparse.Namespace) -> int:
    from backdoors.config import load_config
    from backdoors.experiment import Interrupted, resume, run

    try:
        if args.resume:
            if args.config or args.overrides or args.name:
                return fail("--resume takes no config, --set or --name (the run keeps its own)")
            summary = resume(args.resume, quiet=args.quiet)
        else:
            if not args.config:
                return fail("train needs a CONFIG file (or --resume RUN_DIR)")
            config = load_config(args.config, args.overrides)
            summary = run(config, out=args.out, name=args.name, quiet=args.quiet)
    except Interrupted as stop:
        print(f"interrupted; resume with: backdoors train --resume {stop.run_dir}",
              file=sys.stderr)
        return 130
    print(_summary_line(summary))
    return 0


def _summary_line(summary: dict) -> str:
    def pct(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None else f"{100 * v:.2f}%"

    return (f"{summary['status']}: clean accuracy {pct('clean_accuracy')}, ASR {pct('asr')}, "
            f"robust accuracy {pct('robust_accuracy')}, backdoor accuracy (all) "
            f"{pct('backdoor_accuracy')} -> {summary['run_dir']}")


def _validate(args: argparse.Namespace) -> int:
    from backdoors.assembly.build import build
    from backdoors.config import load_config

    for path in args.files:
        try:
            build(load_config(path, args.overrides))
        except BackdoorsError as exc:
            return fail(f"{path}: {exc}")
        print(f"ok: {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    import backdoors.attacks as attacks
    from backdoors.data import TASKS
    from backdoors.defenses import DEFENSES
    from backdoors.federated import AGGREGATORS
    from backdoors.models import MODELS
    from backdoors.synthesizers import SYNTHESIZERS

    registry = {"tasks": TASKS, "models": MODELS, "synthesizers": SYNTHESIZERS,
                "attacks": attacks.ATTACKS, "balancers": attacks.BALANCERS,
                "loss_terms": attacks.LOSS_TERMS, "defenses": DEFENSES,
                "aggregators": AGGREGATORS}[args.what]
    if not registry.names():
        print(f"(no {args.what} registered)")
        return 0
    width = max(len(n) for n in registry.names())
    for name in registry.names():
        print(f"{name:<{width}}  {registry.describe(name)}")
    return 0


def _show(args: argparse.Namespace) -> int:
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


def _defend(args: argparse.Namespace) -> int:
    from backdoors.assembly.artifact import defend
    from backdoors.config import parse_override
    from backdoors.defenses.scores import format_result

    kwargs = {}
    for text in args.overrides:
        keys, value = parse_override(text)
        if len(keys) != 1:
            return fail(f"--set {text}: defense options are flat (e.g. --set steps=100)")
        kwargs[keys[0]] = value
    print(format_result(defend(args.run_dir, args.defense, kwargs)))
    return 0


def _gallery(args: argparse.Namespace) -> int:
    from backdoors.config import load_config
    from backdoors.gallery import draw_gallery

    if args.n < 1:
        return fail(f"--n must be >= 1, got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        return fail(f"--out must name a .png file, got {out}")
    print(f"wrote {draw_gallery(load_config(args.config, args.overrides), out, args.n)}")
    return 0


def _crashtest(args: argparse.Namespace) -> int:
    from backdoors.config import load_config
    from backdoors.crashtest import crashtest

    if args.units < 0 or args.instants < 0:
        return fail("--units and --instants must be >= 0")
    config = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/crashtest-{config.name}")
    if out.exists() and any(out.iterdir()):
        return fail(f"--out {out} is not empty; crashtest needs a fresh folder")

    def report(scenario: Any) -> None:
        mark = "held  " if scenario.held else "BROKEN"
        print(f"{mark}  kill {scenario.kill}  {scenario.detail}".rstrip(), flush=True)

    results = crashtest(config, out, args.units, args.instants, args.seed, report)
    held = sum(r.held for r in results)
    print(f"{held} of {len(results)} killed runs resumed to the uninterrupted result ({out})")
    return 0 if held == len(results) else 1


def _sweep(args: argparse.Namespace) -> int:
    from backdoors.sweeps import SweepInterrupted, sweep

    try:
        manifest = sweep(args.grid, args.out, args.engine, args.workers, args.address,
                         args.quiet)
    except SweepInterrupted as stop:
        print(f"interrupted; continue with: backdoors sweep {args.grid} --out {args.out} "
              f"({stop})", file=sys.stderr)
        return 130
    counts = manifest.get("counts", {})
    return 0 if not counts.get("failed") else 1


def _report(args: argparse.Namespace) -> int:
    from backdoors.report import report

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    for path in report(args.paths, args.out, formats):
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `backdoors` console script."""
    try:
        args = _parser().parse_args(argv)
        handler = {"train": _train, "validate": _validate, "list": _list, "show": _show,
                   "gallery": _gallery, "defend": _defend, "crashtest": _crashtest,
                   "sweep": _sweep, "report": _report}
        return handler[args.command](args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (errors.report)
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
