"""One writer per run folder: an advisory lock on RUN/.lock.

The operating system drops the lock when its process ends, however it ends (SIGKILL
included), so a killed run never leaves a stale lock behind, and a folder whose summary
says "running" while nobody holds its lock was stopped by a crash.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from types import TracebackType
from typing import IO

from backdoors.errors import RunError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer is then up to the user
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLock:
    """Held while a process trains, resumes or defends a run (`with RunLock(path, what)`)."""

    def __init__(self, run_dir: Path, what: str) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.what = what
        self.file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        try:
            self.file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open
        except OSError as exc:
            raise RunError(f"cannot open {self.path}: {exc.strerror}") from None
        if fcntl is not None:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(self.path)
                self.file.close()
                self.file = None
                raise RunError(f"run folder {self.path.parent} is in use ({holder}); wait for "
                               "that process to finish or stop it") from None
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}, {self.what} since {stamp}\n")
        self.file.flush()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.file is not None:
            if fcntl is not None:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "another process"


def is_locked(run_dir: Path) -> bool:
    """True while some process holds the run's lock."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return False
    with open(path, "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False
