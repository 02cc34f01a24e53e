"""`backdoors sweep GRID.yaml`: run every cell of a grid, resumably, on an engine.

The sweep folder OUT/NAME holds `grid.yaml` (the grid as launched), `manifest.json`
(every cell and its status), `runs/<cell id>/` (one ordinary run folder per attack cell,
named by a hash of what it trains) and `logs/<cell id>.log`. Relaunching the same grid
recomputes nothing that completed: completed cells are skipped, interrupted ones resume
from their last checkpoint, failed ones are retried (`retries` more attempts per
launch), and a changed key makes only the cells it changes new. A cell's failure never
stops the others.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backdoors.assembly.defending import defense_key
from backdoors.errors import ConfigError, RunError
from backdoors.runs import RunFolder, RunLock
from backdoors.sweeps import engines
from backdoors.sweeps.cells import Cell, CellJob, CellOutcome, cells, done
from backdoors.sweeps.grid import Grid, load_grid
from backdoors.sweeps.manifest import MANIFEST, Manifest

ENGINES = ("local", "ray")


class SweepInterrupted(Exception):  # noqa: N818 - reads as "the sweep was interrupted"
    """Ctrl-C or SIGTERM stopped the sweep; relaunching it continues."""


def sweep(grid_path: str | Path, out: str | Path = "runs", engine: str = "local",
          workers: int | None = None, address: str | None = None, quiet: bool = False
          ) -> dict[str, Any]:
    """Run the grid's cells that are not complete; return the manifest."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    grid = load_grid(grid_path)
    grid_cells = cells(grid)  # every cell checked before anything runs
    folder = _sweep_folder(Path(out) / grid.name)
    with RunLock(folder, "sweeping"):
        if grid.path.resolve() != (folder / "grid.yaml").resolve():  # relaunched from it
            shutil.copyfile(grid.path, folder / "grid.yaml")
        manifest = Manifest(folder, grid.name, str(grid.path))
        keys = [defense_key(d) for d in grid.defenses]
        for cell in grid_cells:
            manifest.add(cell, keys)
        manifest.retire_others({c.id for c in grid_cells})
        todo = [c for c in grid_cells if not complete(folder, c, grid)]
        for cell in grid_cells:
            if cell not in todo:
                manifest.mark(cell.id, "completed")
        manifest.save()
        workers = workers or engines.default_workers()
        progress = Progress(manifest, len(grid_cells), workers, quiet)
        for _ in range(grid.retries + 1):
            if not todo:
                break
            jobs = [_job(folder, cell, grid, engine, workers) for cell in todo]
            todo = _run(jobs, {c.id: c for c in todo}, grid, engine, workers, address,
                        manifest, progress)
        progress.finish()
    return manifest.data


def _sweep_folder(path: Path) -> Path:
    if (path / "config.yaml").is_file() and not (path / MANIFEST).is_file():
        raise RunError(f"{path} is a run folder, not a sweep; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create sweep folder {path}: {exc.strerror}") from None
    return path


def complete(folder: Path, cell: Cell, grid: Grid) -> bool:
    """The cell's attack completed and every defense of the grid has its result."""
    run = RunFolder(folder / "runs" / cell.id)
    if not (run.path / "summary.json").is_file():
        return False
    try:
        if run.read_summary().get("status") != "completed":
            return False
    except RunError:
        return False
    return all(done(run, d) for d in grid.defenses)


def _job(folder: Path, cell: Cell, grid: Grid, engine: str, workers: int) -> CellJob:
    threads = grid.cpus_per_cell or (engines.local_threads(workers) if engine == "local" else 1)
    return CellJob(cell.id, cell.data, [d.as_dict() for d in grid.defenses],
                   str(folder / "runs"), str(folder / "logs" / f"{cell.id}.log"), threads)


def _run(jobs: list[CellJob], by_id: dict[str, Cell], grid: Grid, engine: str, workers: int,
         address: str | None, manifest: Manifest, progress: Progress) -> list[Cell]:
    """Run the jobs; record each outcome; return the cells to try again."""
    outcomes: Iterator[CellOutcome]
    if engine == "ray":
        outcomes = engines.ray(jobs, address, jobs[0].threads, grid.gpus_per_cell)
    else:
        outcomes = engines.local(jobs, workers)
    retry: list[Cell] = []
    running = {job.cell_id for job in jobs}
    for cell_id in running:
        manifest.mark(cell_id, "queued")
    manifest.save()
    try:
        for outcome in outcomes:
            running.discard(outcome.cell_id)
            failed_defenses = {k: v for k, v in outcome.defenses.items() if v != "completed"}
            if outcome.status == "completed" and failed_defenses:
                key, why = next(iter(failed_defenses.items()))
                outcome.status, outcome.error = "failed", f"defense {key}: {why}"
            manifest.update(outcome)
            manifest.save()
            progress.report(by_id[outcome.cell_id], outcome)
            if outcome.status == "interrupted":
                raise KeyboardInterrupt
            if outcome.status == "failed":
                retry.append(by_id[outcome.cell_id])
    except KeyboardInterrupt:
        for cell_id in running:
            manifest.mark(cell_id, "interrupted")
        manifest.save()
        raise SweepInterrupted(str(manifest.folder.path)) from None
    return retry


class Progress:
    """One line per finished cell: counts, elapsed time and an estimate of what is left."""

    def __init__(self, manifest: Manifest, total: int, workers: int, quiet: bool) -> None:
        self.manifest, self.total, self.workers, self.quiet = manifest, total, workers, quiet
        self.start = time.perf_counter()
        self.finished_here = 0
        self._line(f"sweep {manifest.data['name']}: {total} cells, "
                   f"{manifest.counts().get('completed', 0)} already complete")

    def report(self, cell: Cell, outcome: CellOutcome) -> None:
        self.finished_here += 1
        counts = self.manifest.counts()
        done_, failed = counts.get("completed", 0), counts.get("failed", 0)
        running = min(self.workers, counts.get("queued", 0))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.finished_here * counts.get("queued", 0)
        what = outcome.status + (f" ({outcome.error})" if outcome.error else "")
        self._line(f"[{done_}/{self.total} done | {running} running | {failed} failed | "
                   f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}] {cell.label} seed "
                   f"{cell.seed}: {what} in {outcome.seconds:.0f}s")

    def finish(self) -> None:
        counts = self.manifest.counts()
        self._line(f"sweep {self.manifest.data['name']}: {counts.get('completed', 0)} of "
                   f"{self.total} cells complete, {counts.get('failed', 0)} failed, in "
                   f"{_clock(time.perf_counter() - self.start)} -> {self.manifest.folder.path}")

    def _line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stdout, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
