"""Cells: one attack run each, named by a hash of what it trains, with its defenses.

`cells(grid)` validates every cell before anything runs; `run_cell(job)` is the one
function every engine runs (a process pool, Ray): it trains the attack, or resumes it,
or does nothing when it completed, then runs the defenses it does not have yet on the
finished run. A cell's run folder is an ordinary run folder (`backdoors show`, `defend`
and `report` work on it).
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backdoors.assembly.build import build, fingerprint, resolved_config
from backdoors.assembly.defending import defend_all, defense_key
from backdoors.config import Component, from_dict
from backdoors.defenses import DEFENSES
from backdoors.defenses.runner import check_fits
from backdoors.errors import BackdoorsError, ConfigError
from backdoors.experiment import Interrupted, resume, run
from backdoors.runs import RunFolder
from backdoors.sweeps.grid import Grid, points


@dataclass(frozen=True)
class Cell:
    """A validated point of the grid: `id` names its run folder."""

    label: str
    axes: dict[str, Any]
    case: str | None
    seed: int
    data: dict[str, Any]
    fingerprint: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", self.label).strip("_.")[:60] or "cell"
        return f"{slug}-s{self.seed}-{self.fingerprint[:10]}"


def cells(grid: Grid) -> list[Cell]:
    """Every cell of the grid, each built (components, devices, files) without data; the
    first bad one is a ConfigError naming the cell."""
    out: dict[str, Cell] = {}
    for point in points(grid):
        where = f"{grid.path}: cell '{point.label}' (seed {point.seed})"
        try:
            config = from_dict({**point.data, "name": "cell"})
            comps = build(config)
            for i, d in enumerate(grid.defenses):
                check_fits(DEFENSES.build(d.name, d.kwargs, f"defenses[{i}]"),
                           config.federated is not None, f"defenses[{i}]")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        cell = Cell(point.label, point.axes, point.case, point.seed, point.data,
                    fingerprint(resolved_config(config, comps)))
        if cell.fingerprint in out:
            raise ConfigError(f"{where} trains the same config as cell "
                              f"'{out[cell.fingerprint].label}'; give the cases different "
                              "settings")
        out[cell.fingerprint] = cell
    return list(out.values())


@dataclass(frozen=True)
class CellJob:
    """What a worker needs to run a cell: plain data, so it pickles to any engine."""

    cell_id: str
    data: dict[str, Any]
    defenses: list[dict[str, Any]]
    runs_dir: str
    log: str
    threads: int


@dataclass
class CellOutcome:
    """How a cell ended: `status` completed / failed / interrupted, the error if any, and
    each defense's status (key -> "completed" or the failure)."""

    cell_id: str
    status: str
    error: str | None = None
    defenses: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def run_cell(job: CellJob) -> CellOutcome:
    """Train (or resume, or skip) the cell's attack, then its missing defenses. Never
    raises for a failed run or defense: the outcome says what happened. Output goes to
    the cell's log file."""
    start = time.perf_counter()
    torch.set_num_threads(job.threads)  # the same count in every engine: the same numbers
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} cell {job.cell_id}", flush=True)
        outcome = _attack(job)
        if outcome.status == "completed":
            outcome.defenses = _defenses(job)
        print(f"--- {outcome.status}" + (f": {outcome.error}" if outcome.error else ""),
              flush=True)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _attack(job: CellJob) -> CellOutcome:
    folder = Path(job.runs_dir) / job.cell_id
    try:
        if not (folder / "config.yaml").is_file():
            run(from_dict({**job.data, "name": job.cell_id}), out=job.runs_dir,
                name=job.cell_id)
        elif RunFolder(folder).read_summary().get("status") != "completed":
            resume(folder)
    except Interrupted:
        return CellOutcome(job.cell_id, "interrupted")
    except KeyboardInterrupt:
        return CellOutcome(job.cell_id, "interrupted")
    except Exception as exc:  # noqa: BLE001 - a cell's failure must not stop the others
        return CellOutcome(job.cell_id, "failed", _line(exc))
    return CellOutcome(job.cell_id, "completed")


def _defenses(job: CellJob) -> dict[str, str]:
    """Run the defenses whose result the run folder lacks (reopened once)."""
    folder = RunFolder(Path(job.runs_dir) / job.cell_id)
    wanted = [Component(d["name"], {k: v for k, v in d.items() if k != "name"})
              for d in job.defenses]
    missing = [d for d in wanted if not done(folder, d)]
    errors: dict[str, str] = {}
    if missing:
        try:
            defend_all(folder, missing, quiet=False, errors=errors)
        except (BackdoorsError, OSError, RuntimeError) as exc:  # reopening failed
            errors.update({defense_key(d): _line(exc) for d in missing})
    return {defense_key(d): errors.get(defense_key(d), "completed") for d in wanted}


def done(folder: RunFolder, defense: Component) -> bool:
    """Whether the run folder holds this defense's result (under these options)."""
    return (folder.path / "defenses" / defense_key(defense) / "result.json").is_file()


def _line(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0]
    return text if isinstance(exc, BackdoorsError) else f"{type(exc).__name__}: {text}"
