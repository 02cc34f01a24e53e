"""The `backdoors` command line: its subcommands and their arguments."""

from __future__ import annotations

import argparse

from backdoors.errors import fail
from backdoors.version import __version__

LISTABLE = ("tasks", "models", "synthesizers", "attacks", "balancers", "loss_terms",
            "defenses", "aggregators", "attackers")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit code 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(fail(f"{self.prog}: {message}"))


def _sets(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"{what} (repeatable)")


def _runs(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model under attack (or resume a run)")
    t.add_argument("config", nargs="?", help="YAML config (native or Backdoors 101 flat file)")
    _sets(t, "override a config value, e.g. --set train.lr=0.1; with --resume, only what "
             "moves the run (task.data_dir=..., train.device=...)")
    t.add_argument("--out", default="runs", help="parent folder of run folders (default runs/)")
    t.add_argument("--name", help="run folder name (must not exist); default NAME-TIMESTAMP")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    v = sub.add_parser("validate", help="check config files without loading data")
    v.add_argument("files", nargs="+")
    _sets(v, "override a config value")
    c = sub.add_parser("crashtest", help="kill a config's run at every write and at random "
                       "instants; check each resume ends exactly as an uninterrupted run")
    c.add_argument("config")
    c.add_argument("--out", help="work folder (default runs/crashtest-NAME)")
    c.add_argument("--units", type=int, default=3,
                   help="kill after every write of the first N epochs/rounds (default 3)")
    c.add_argument("--instants", type=int, default=30,
                   help="also kill at N random instants (default 30)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random instants")
    _sets(c, "override a config value")


def _grids(sub: argparse._SubParsersAction) -> None:
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
    a = sub.add_parser("data", help="prepare a dataset where the shipped configs look for it")
    a.add_argument("dataset", help="mnist, mnist-split (the project's MNIST split) or cifar10")
    a.add_argument("--from", dest="source", default=None,
                   help="where to take it from (default: ../shared/data when present, else "
                        "download)")
    a.add_argument("--to", dest="dest", default=None,
                   help="where to put it (default: .data/mnist, .data/mnist-split, "
                        ".data/cifar10)")


def _looks(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("list", help="list registered components, or describe one")
    ls.add_argument("what", choices=LISTABLE)
    ls.add_argument("name", nargs="?", help="a component: print its docstring and options")
    s = sub.add_parser("show", help="a compact table of runs (or sweep cells)")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--json", action="store_true", help="print each run's summary.json")
    d = sub.add_parser("defend", help="run a defense on a finished attack run")
    d.add_argument("run_dir")
    d.add_argument("--defense", required=True, help="defense name (backdoors list defenses)")
    _sets(d, "a defense option (--set steps=100), or a dotted key that moves the run "
             "(--set task.data_dir=...)")
    d.add_argument("--on", metavar="KEY", default=None,
                   help="run on the model an earlier defense made (its key under defenses/, "
                        "e.g. fine_pruning), to chain defenses")
    d.add_argument("--replace", action="store_true",
                   help="run again although a result under the same options exists")
    g = sub.add_parser("gallery", help="draw clean vs triggered test images to a PNG (from a "
                       "config), or a trained run's predictions on them (from a run folder)")
    g.add_argument("config", help="a config file, or a finished run folder")
    g.add_argument("--out", required=True, help="PNG file to write")
    g.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    _sets(g, "override a config value")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="backdoors", description="Backdoor attacks and defenses for deep learning.")
    p.add_argument("--version", action="version", version=f"backdoors {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    _runs(sub)
    _grids(sub)
    _looks(sub)
    return p
