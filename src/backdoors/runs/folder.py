"""A run folder: its files, read and written in one place.

Layout of one run:
    config.yaml     resolved config (defaults filled in)
    env.json        versions, git commit, seed, threads, command line (env-resume-*.json
                    for each resume)
    metrics.jsonl   one JSON row per event, append-only: the source of truth
    summary.json    final figures and status (running / completed / interrupted / failed)
    attack.json     trigger spec, poison indices and fingerprints (what a defense needs)
    trigger.safetensors   learned trigger tensors, when the trigger has any
    checkpoints/    commit.pt (the atomic checkpoint resume reads), last.safetensors,
                    best.safetensors, epoch_N.safetensors
    defenses/NAME/  result.json and figures of each defense run on the model
    tb/             TensorBoard events
    .lock           held by the one process writing the folder
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from backdoors.errors import RunError
from backdoors.runs.files import append_line, truncate, write_text
from backdoors.version import __version__


def clean_json(value: Any) -> Any:
    """JSON-safe: NaN and inf become null, tensors become numbers."""
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return clean_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunFolder:
    """Reads and writes the files of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    @classmethod
    def existing(cls, path: str | Path) -> RunFolder:
        """An existing run folder (one with config.yaml), else a one-line RunError."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise RunError(f"{p} is a file; expected a run folder")
        if not p.is_dir():
            raise RunError(f"run folder not found: {p}")
        if not (p / "config.yaml").is_file():
            raise RunError(f"{p} is not a run folder (no config.yaml)")
        return cls(p)

    # --- JSON files --------------------------------------------------------------------

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(clean_json(data), indent=2))

    def read_json(self, name: str, missing: dict[str, Any] | None = None) -> dict[str, Any]:
        """A JSON mapping from the folder; `missing` (if given) when the file is absent."""
        path = self.path / name
        if not path.is_file() and missing is not None:
            return missing
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{path} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"{path} is damaged ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise RunError(f"{path} is damaged (expected a JSON object)")
        return data

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json("summary.json", summary)

    def read_summary(self) -> dict[str, Any]:
        return self.read_json("summary.json", missing={})

    def write_config(self, text: str) -> None:
        write_text(self.path / "config.yaml", text)

    def write_env(self, seed: int, device: str, resumed: bool = False) -> None:
        env = {
            "backdoors": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device": device,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            # Float sums depend on how work is split over threads: resume restores this
            # count so a resumed run repeats an uninterrupted one bit for bit.
            "threads": torch.get_num_threads(),
            "git_commit": git_commit(),
            "seed": seed,
            "argv": sys.argv,
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        name = "env.json" if not resumed else f"env-resume-{env['time'].replace(':', '')}.json"
        self.write_json(name, env)

    def threads(self) -> int | None:
        """The intra-op thread count the run started with (None if unknown)."""
        value = self.read_json("env.json", missing={}).get("threads")
        return value if isinstance(value, int) and value >= 1 else None

    # --- metrics.jsonl -----------------------------------------------------------------

    def log(self, row: dict[str, Any]) -> int:
        """Append a row; return the log's size in bytes after it."""
        return append_line(self.metrics, json.dumps(clean_json(row)))

    def log_size(self) -> int:
        return self.metrics.stat().st_size if self.metrics.is_file() else 0

    def cut_log(self, size: int) -> None:
        """Drop whatever was logged after the first `size` bytes."""
        have = self.log_size()
        if have < size:
            raise RunError(f"{self.metrics} is shorter than its last checkpoint says "
                           f"({have} < {size} bytes); it was damaged or edited")
        if have > size:
            truncate(self.metrics, size)

    def rows(self) -> list[dict[str, Any]]:
        """Every logged row, oldest first."""
        if not self.metrics.is_file():
            return []
        try:
            lines = self.metrics.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RunError(f"{self.metrics} cannot be read ({exc})") from None
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise RunError(f"{self.metrics} line {i} is not valid JSON; the log was "
                               "damaged") from None
            if not isinstance(row, dict):
                raise RunError(f"{self.metrics} line {i} is not a JSON object")
            out.append(row)
        return out


def create_run_folder(out: str | Path, name: str, exact: bool, config_text: str) -> RunFolder:
    """A new run folder holding config.yaml. With `exact` the folder is `out/name`, which
    must not exist; otherwise `out/name-TIMESTAMP` (and a counter if needed). The folder
    is built under a hidden temporary name and renamed into place, so a run folder always
    has its config, and an existing folder is never touched."""
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create --out folder {root}: {exc.strerror}") from None
    if not root.is_dir():
        raise RunError(f"--out {root} is not a folder")
    tmp = root / f".{name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        (tmp / "checkpoints").mkdir()
    except OSError as exc:
        raise RunError(f"cannot create a run folder in {root}: {exc.strerror}") from None
    RunFolder(tmp).write_config(config_text)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        path = root / name if exact else root / (f"{name}-{stamp}" + (f"-{i}" if i > 1 else ""))
        if not path.exists():
            try:
                os.rename(tmp, path)  # fails if another process took the name meanwhile
            except OSError:
                continue
            return RunFolder(path)
        if exact:
            break
    _remove_tree(tmp)
    raise RunError(f"run folder {root / name} already exists; choose another --name, or "
                   f"continue it with: backdoors train --resume {root / name}")


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()
