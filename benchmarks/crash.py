"""Crash campaign: kill the quickstart run after every file written in its first three
epochs and at 30 random instants, resume each, and check every one ends with the
uninterrupted run's metrics and weights; the same for a federated variant of it.

Run: python benchmarks/crash.py [--instants 30] [--out benchmarks/results/crash.md]
(about 10-20 minutes on two CPU cores). Writes a Markdown table of the kills.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, table_row, write_table  # noqa: E402

from backdoors.config import load_config  # noqa: E402
from backdoors.crashtest import Scenario, crashtest  # noqa: E402

FEDERATED = ["federated={rounds: 6, participants: 10, per_round: 5, local_epochs: 1, "
             "adversaries: 2, weight_scale: 2, aggregator: {name: foolsgold}}",
             "attack={name: data, ratio: 0.2}", "train.scheduler=none"]
CAMPAIGNS = [("quickstart (8 epochs, blind + MGDA)", []),
             ("quickstart, federated (FoolsGold, 2 data-poisoning attackers)", FEDERATED)]


def kind(scenario: Scenario) -> str:
    """'after <file>' or 'random instant'."""
    if scenario.kill.startswith("after write"):
        return "after " + scenario.kill.split("(")[-1].rstrip(")")
    return "random instant"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=3)
    parser.add_argument("--instants", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/crash.md")
    args = parser.parse_args()
    rows, notes = [], []
    for title, overrides in CAMPAIGNS:
        config = load_config(REPO / "configs/quickstart.yaml", overrides)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            results = crashtest(config, Path(tmp) / "crash", args.units, args.instants,
                                report=lambda s: print(("held  " if s.held else "BROKEN"),
                                                       s.kill, s.detail, flush=True))
        minutes = (time.perf_counter() - start) / 60
        by_kind: dict[str, list[bool]] = collections.defaultdict(list)
        for r in results:
            by_kind[kind(r)].append(r.held)
        for k, held in by_kind.items():
            rows.append(table_row(title, k, len(held), sum(held)))
        broken = [f"{r.kill}: {r.detail}" for r in results if not r.held]
        notes.append(f"- {title}: {sum(r.held for r in results)} of {len(results)} kills held "
                     f"({minutes:.1f} min)" + (f"; broken: {'; '.join(broken)}" if broken else ""))
    title = (f"Crash campaign (`backdoors crashtest`): every file written in the first "
             f"{args.units} epochs or rounds, and {args.instants} random instants; each "
             f"killed run resumed and compared with an uninterrupted one (metrics.jsonl rows "
             f"but timings, last and best weights). {machine()}.")
    write_table(args.out, title, ["run", "kill", "kills", "resumed identical"], rows)
    with open(args.out, "a") as f:
        f.write("\n" + "\n".join(notes) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
