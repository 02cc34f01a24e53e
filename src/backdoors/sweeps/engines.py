"""Engines: thin adapters that run cell jobs somewhere and hand back their outcomes as
they finish. Every engine calls the same `run_cell`, with the same thread count per cell,
so a grid gives the same numbers on a local pool and on Ray."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from collections.abc import Iterator
from typing import Any

import torch

from backdoors.errors import ConfigError
from backdoors.sweeps.cells import CellJob, CellOutcome, run_cell


def default_workers() -> int:
    """One worker per GPU; one on a CPU-only machine (its threads use every core)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def local_threads(workers: int) -> int:
    """Intra-op threads per worker so that workers do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def _die_with_parent() -> None:
    """No orphan keeps training a cell after the sweep was killed (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _cell_process(job: CellJob, results: Any, gpu: int | None) -> None:
    """A worker: one cell in a fresh process, its outcome sent back on `results`."""
    _die_with_parent()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    results.put(run_cell(job))


def local(jobs: list[CellJob], workers: int) -> Iterator[CellOutcome]:
    """At most `workers` cells at a time, each in a spawned process of its own: no state
    passes from one cell to the next, a worker that dies fails only its cell, and
    stopping the sweep stops every worker at once (their runs resume on relaunch)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    pending, running = list(jobs), {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                gpu = gpus.pop(0) if gpus else None
                process = ctx.Process(target=_cell_process, args=(job, results, gpu))
                process.start()
                running[job.cell_id] = (process, job, gpu)
            try:
                outcome = results.get(timeout=0.5)
            except queue.Empty:
                yield from _dead(running, gpus)
                continue
            process, _, gpu = running.pop(outcome.cell_id)
            process.join()
            if gpu is not None:
                gpus.append(gpu)
            yield outcome
    finally:
        for process, _, _ in running.values():
            process.kill()
            process.join()


def _dead(running: dict[str, Any], gpus: list[int]) -> Iterator[CellOutcome]:
    """Outcomes for workers that died without reporting (killed, out of memory)."""
    for cell_id, (process, _, gpu) in list(running.items()):
        if not process.is_alive() and process.exitcode not in (0, None):
            running.pop(cell_id)
            if gpu is not None:
                gpus.append(gpu)
            yield CellOutcome(cell_id, "failed", f"worker died (exit code {process.exitcode})")


def ray(jobs: list[CellJob], address: str | None, cpus: int, gpus: float
        ) -> Iterator[CellOutcome]:
    """Ray tasks with declared resources (fractional GPUs pack small cells on one GPU),
    on the Ray instance already started in this process, a local one, or the cluster at
    `address`. Cells write to their run folders directly: on a cluster, --out must be a
    file system every node sees."""
    try:
        import ray as ray_lib
    except ImportError:
        raise ConfigError('--engine ray needs Ray, which is not installed; install it with: '
                          'pip install "backdoors[ray]"') from None
    started = not ray_lib.is_initialized()
    if started:
        ray_lib.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    remote = ray_lib.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_cell)
    refs = {remote.remote(job): job for job in jobs}
    try:
        while refs:
            ready, _ = ray_lib.wait(list(refs), num_returns=1)
            job = refs.pop(ready[0])
            try:
                yield ray_lib.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - a lost task fails its cell only
                first = (str(exc).splitlines() or [type(exc).__name__])[-1]
                yield CellOutcome(job.cell_id, "failed", f"ray task failed: {first}")
    finally:
        for ref in refs:
            ray_lib.cancel(ref, force=True)
        if started:
            ray_lib.shutdown()
