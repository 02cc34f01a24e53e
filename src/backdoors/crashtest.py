"""Crash testing a config: kill its run after every file the lifecycle writes and at random
instants, resume each, and check that every one ends exactly where an uninterrupted run
ends (same metrics.jsonl rows but for timings, same final and best weights).

This is what `backdoors crashtest CONFIG` runs. It proves the lifecycle's promise
(experiment.py) for a given attack, trigger and loop, which matters when you add a
component with state of its own: state left out of its `state_dict` shows up here as a
resumed run that drifts. Runs are forked child processes killed with SIGKILL (POSIX
only), all with one intra-op thread, so that float sums are the same in every process.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from backdoors.config import Config
from backdoors.errors import ConfigError
from backdoors.experiment import resume, run
from backdoors.runs import RunFolder
from backdoors.runs.files import crash_after, trace_writes

TIMING = ("train_seconds", "local_train_seconds", "aggregate_seconds", "eval_seconds",
          "round_seconds", "seconds_per_epoch", "seconds_per_round")


@dataclass
class Scenario:
    """One kill and its resume: where the kill landed and whether the run held."""

    kill: str
    held: bool
    detail: str = ""


def crashtest(config: Config, workdir: Path, units: int = 3, instants: int = 30,
              seed: int = 0, report: Callable[[Scenario], None] | None = None
              ) -> list[Scenario]:
    """Kill `config`'s run after each file written in its first `units` epochs (or rounds)
    and at `instants` random instants; resume each; compare with an uninterrupted run."""
    if not hasattr(os, "fork"):
        raise ConfigError("crashtest forks and kills processes: it needs Linux or macOS")
    torch.set_num_threads(1)  # before any torch work: fork-safe, same sums everywhere
    workdir.mkdir(parents=True, exist_ok=True)
    trace = workdir / "reference.writes"
    trace.unlink(missing_ok=True)
    # The reference runs here, so every forked run starts warm (imports, first-call
    # set-up), which makes the kill instants land in comparable places.
    trace_writes(trace)
    run(config, workdir, "reference", quiet=True)
    trace_writes(None)
    reference = workdir / "reference"
    start = time.perf_counter()  # how long a warm, forked run takes: where instants fall
    _child(workdir, lambda: run(config, workdir, "timing", quiet=True))
    duration = time.perf_counter() - start
    writes = [line.split("\t", 1) for line in trace.read_text().splitlines()]
    kills: list[tuple[str, Any]] = [
        (f"after write {n} ({_short(path, workdir)})", int(n))
        for n, path in writes[: _first_units(writes, units)]]
    rng = random.Random(seed)
    kills += [(f"at {t:.2f}s", t) for t in sorted(rng.uniform(0, duration)
                                                   for _ in range(instants))]
    results = []
    for i, (label, when) in enumerate(kills):
        name = f"kill-{i:03d}"
        _kill(config, workdir, name, when)
        held, detail = same_run(reference, workdir / name)
        results.append(Scenario(label, held, detail))
        if report is not None:
            report(results[-1])
    return results


def _first_units(writes: list[list[str]], units: int) -> int:
    """How many writes a run makes before its unit `units + 1` starts: up to the summary
    written after the commit of unit `units` (commit 0 is the one before training)."""
    commits = [i for i, (_, path) in enumerate(writes) if path.endswith("commit.pt")]
    if len(commits) <= units + 1:
        return len(writes)
    after = [i for i, (_, path) in enumerate(writes)
             if i > commits[units] and path.endswith("summary.json")]
    return (after[0] + 1) if after else len(writes)


def _short(path: str, workdir: Path) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts[-2] == "checkpoints" else parts[-1]


def _kill(config: Config, workdir: Path, name: str, when: int | float) -> None:
    """Run `name` until the kill, then resume it (or start it again, if it was killed
    before its folder existed) to the end."""
    def start() -> None:
        if isinstance(when, int):
            crash_after(when)
        run(config, workdir, name, quiet=True)

    _child(workdir, start, None if isinstance(when, int) else float(when))
    folder = workdir / name
    if not (folder / "config.yaml").is_file():
        _child(workdir, lambda: run(config, workdir, name, quiet=True))
    elif RunFolder(folder).read_summary().get("status") != "completed":
        _child(workdir, lambda: resume(folder, quiet=True))


def _child(workdir: Path, work: Callable[[], Any], kill_after: float | None = None) -> None:
    """Run `work` in a forked process (output discarded, errors to errors.log); with
    `kill_after`, SIGKILL it after that many seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            work()
        except BaseException:  # noqa: BLE001 - report anything, then leave the child
            with open(workdir / "errors.log", "a", encoding="utf-8") as f:
                f.write(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    if kill_after is not None:
        deadline = time.perf_counter() + kill_after
        while time.perf_counter() < deadline:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return  # finished before the kill came
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def same_run(reference: Path, other: Path) -> tuple[bool, str]:
    """Whether two completed runs logged the same rows (timings aside) and ended with the
    same last and best weights; else the first difference."""
    a, b = RunFolder(reference), RunFolder(other)
    if b.read_summary().get("status") != "completed":
        return False, f"status {b.read_summary().get('status')} after resume"
    rows_a, rows_b = _untimed(a.rows()), _untimed(b.rows())
    if len(rows_a) != len(rows_b):
        return False, f"{len(rows_b)} logged rows, expected {len(rows_a)}"
    for i, (x, y) in enumerate(zip(rows_a, rows_b, strict=True)):
        if x != y:
            return False, f"row {i + 1} differs: {x.get('kind')} {x.get('epoch')}"
    for name in ("last.safetensors", "best.safetensors"):
        wa, wb = load_file(a.checkpoints / name), load_file(b.checkpoints / name)
        if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
            return False, f"checkpoints/{name} differs"
    return True, ""


def _untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
