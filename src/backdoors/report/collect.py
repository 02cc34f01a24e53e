"""Gather the runs a report covers: sweep folders (their manifest names each cell's row
and seed) or any run folders, read from disk only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from backdoors.config import load_yaml
from backdoors.errors import RunError
from backdoors.runs import RunFolder
from backdoors.sweeps.manifest import MANIFEST

# Keys that do not change what is trained, left out when grouping loose runs into rows.
UNGROUPED = ("name", "seed", "defenses")


@dataclass
class Record:
    """One finished attack run: the table row it belongs to and its seed. `grid`: the
    defense keys its sweep's grid asks for (None outside a sweep: every defense run on
    it); a defense the run keeps from an earlier version of the grid is not reported."""

    folder: RunFolder
    row: str
    seed: int
    grid: tuple[str, ...] | None = None

    @cached_property
    def summary(self) -> dict[str, Any]:
        return self.folder.read_summary()

    @cached_property
    def config(self) -> dict[str, Any]:
        return load_yaml((self.folder.path / "config.yaml").read_text(encoding="utf-8")) or {}

    @cached_property
    def curve(self) -> list[dict[str, Any]]:
        """The epoch (or round) rows of the run, in order."""
        return [r for r in self.folder.rows() if r.get("kind") in ("epoch", "round")]

    @property
    def defenses(self) -> dict[str, dict[str, Any]]:
        found = self.summary.get("defenses", {})
        return found if self.grid is None else {k: v for k, v in found.items()
                                                 if k in self.grid}


def collect(paths: list[str | Path]) -> tuple[list[Record], list[str]]:
    """Completed runs under `paths` (sweep folders, run folders, or folders holding
    either), and notes on what was left out (runs not completed)."""
    records: list[Record] = []
    notes: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise RunError(f"not found: {path}")
        if (path / MANIFEST).is_file():
            _sweep(path, records, notes)
        elif (path / "config.yaml").is_file():
            _loose([path], records, notes)
        elif path.is_dir():
            kids = sorted(p for p in path.iterdir() if p.is_dir())
            for kid in (k for k in kids if (k / MANIFEST).is_file()):
                _sweep(kid, records, notes)
            _loose([k for k in kids if (k / "config.yaml").is_file()], records, notes)
        else:
            raise RunError(f"{path} is neither a run folder nor a sweep folder")
    if not records:
        raise RunError(f"no completed runs under {', '.join(map(str, paths))}")
    return records, notes


def _completed(folder: RunFolder, notes: list[str]) -> bool:
    status = folder.read_summary().get("status")
    if status != "completed":
        notes.append(f"{folder.path.name}: {status or 'not started'}, left out")
    return status == "completed"


def _sweep(path: Path, records: list[Record], notes: list[str]) -> None:
    manifest = RunFolder(path).read_json(MANIFEST)
    for cell_id, entry in manifest.get("cells", {}).items():
        folder = RunFolder(path / entry.get("run_dir", f"runs/{cell_id}"))
        if entry.get("in_grid", True) and (folder.path / "config.yaml").is_file() \
                and _completed(folder, notes):
            records.append(Record(folder, entry["label"], int(entry["seed"]),
                                  tuple(entry.get("defenses", {}))))


def _loose(paths: list[Path], records: list[Record], notes: list[str]) -> None:
    """Runs outside a sweep: one row per config (seeds apart), named by the config's name
    (with a short hash where two configs share a name)."""
    found = [(RunFolder(p), _group(RunFolder(p))) for p in paths]
    names: dict[str, set[str]] = {}
    for _, (name, group) in found:
        names.setdefault(name, set()).add(group)
    for folder, (name, group) in found:
        if _completed(folder, notes):
            row = name if len(names[name]) == 1 else f"{name} #{group[:6]}"
            config = load_yaml((folder.path / "config.yaml").read_text(encoding="utf-8"))
            records.append(Record(folder, row, int(config.get("seed", 0))))


def _group(folder: RunFolder) -> tuple[str, str]:
    config = load_yaml((folder.path / "config.yaml").read_text(encoding="utf-8")) or {}
    kept = {k: v for k, v in config.items() if k not in UNGROUPED}
    task = dict(kept.get("task") or {})
    task.pop("data_dir", None)
    kept["task"] = task
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    return str(config.get("name", folder.path.name)), digest
