"""Publishing a file in a run folder: atomically and durably, and observably.

A file is written to a temporary sibling, flushed to disk (fsync), renamed over its
final name and the folder entry synced, so after a crash, a kill or a full disk it holds
either its old or its new content, never a mix. Appends (metrics.jsonl) are fsynced too.

Every publication passes through `published`, which serves crash testing
(`backdoors crashtest`, crashtest.py): after `crash_after(n)` (or with the environment
variable BACKDOORS_CRASH_AFTER_WRITES=n) the process kills itself with SIGKILL right after
its n-th published file; after `trace_writes(path)` (or BACKDOORS_WRITE_TRACE=path) it
appends "n<TAB>file" to `path` for each one.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from backdoors.errors import RunError

_crash: dict[str, Any] = {"written": 0, "kill_at": None, "trace": None}


def crash_after(n: int | None) -> None:
    """Kill this process (SIGKILL) right after the n-th file it publishes from now on;
    None: never."""
    _crash.update(written=0, kill_at=n)


def trace_writes(path: str | Path | None) -> None:
    """Append "n<TAB>file" to `path` for each file published from now on; None: stop."""
    _crash.update(written=0, trace=path)


def published(path: Path) -> None:
    """Count one published file; kill or trace as crash testing asked."""
    _crash["written"] += 1
    if _crash["trace"] is not None:
        with open(_crash["trace"], "a", encoding="utf-8") as f:
            f.write(f"{_crash['written']}\t{path}\n")
    if _crash["kill_at"] is not None and _crash["written"] >= _crash["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("BACKDOORS_CRASH_AFTER_WRITES", "").isdigit():
    crash_after(int(os.environ["BACKDOORS_CRASH_AFTER_WRITES"]))
if os.environ.get("BACKDOORS_WRITE_TRACE"):
    trace_writes(os.environ["BACKDOORS_WRITE_TRACE"])


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles: the rename is what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Publish `path` with the bytes `write(f)` puts into an open binary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
    _sync_dir(path.parent)
    published(path)


def write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_line(path: Path, line: str) -> int:
    """Append one line durably; return the file's size after it."""
    try:
        with open(path, "ab") as f:
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
    published(path)
    return size


def truncate(path: Path, size: int) -> None:
    """Cut `path` back to `size` bytes (rows a killed process wrote after its last
    checkpoint)."""
    try:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
