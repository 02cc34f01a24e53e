"""Commands over many runs: sweep, report, and data (preparing datasets)."""

from __future__ import annotations

import argparse
import sys


def sweep(args: argparse.Namespace) -> int:
    from backdoors.sweeps import SweepInterrupted
    from backdoors.sweeps import sweep as run_sweep

    try:
        manifest = run_sweep(args.grid, args.out, args.engine, args.workers, args.address,
                             args.quiet)
    except SweepInterrupted as stop:
        print(f"interrupted; continue with: backdoors sweep {args.grid} --out {args.out} "
              f"({stop})", file=sys.stderr)
        return 130
    return 0 if not manifest.get("counts", {}).get("failed") else 1


def report(args: argparse.Namespace) -> int:
    from backdoors.report import report as write_report

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    for path in write_report(args.paths, args.out, formats):
        print(f"wrote {path}")
    return 0


def data(args: argparse.Namespace) -> int:
    from backdoors.prepare import prepare

    print(f"ready: {prepare(args.dataset, args.source, args.dest)}")
    return 0
