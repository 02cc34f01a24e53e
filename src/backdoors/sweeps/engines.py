"""Engines: thin adapters that run cell jobs somewhere and hand back their outcomes as
they finish. Every engine calls the same `run_cell`, with the same thread count per cell,
so a grid gives the same numbers on a local pool and on Ray."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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


def _worker_start(gpus: Any) -> None:
    """In each pool process: die with the sweep (no orphan keeps training a cell after
    the sweep was killed), and take a GPU of its own when there are several."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())


def local(jobs: list[CellJob], workers: int) -> Iterator[CellOutcome]:
    """A pool of `workers` spawned processes (spawn: no state shared with the parent)."""
    ctx = multiprocessing.get_context("spawn")
    gpus = None
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        gpus = ctx.Queue()
        for i in range(workers):
            gpus.put(i % torch.cuda.device_count())
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_start,
                               initargs=(gpus,))
    futures: dict[Future[CellOutcome], CellJob] = {pool.submit(run_cell, j): j for j in jobs}
    try:
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                job = futures.pop(future)
                try:
                    yield future.result()
                except Exception as exc:  # noqa: BLE001 - a dead worker fails its cell only
                    yield CellOutcome(job.cell_id, "failed", f"worker died: {exc}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
