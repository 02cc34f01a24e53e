"""A sweep's manifest (SWEEP/manifest.json): every cell, its row label, axes, seed, run
folder and status, and its defenses' statuses; rewritten atomically after every event, so
it always says where a sweep stands, even after a crash."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from backdoors.runs import RunFolder
from backdoors.sweeps.cells import Cell, CellOutcome

MANIFEST = "manifest.json"


class Manifest:
    """The cells of a sweep and where each stands."""

    def __init__(self, folder: Path, name: str, grid: str) -> None:
        self.folder = RunFolder(folder)
        self.data: dict[str, Any] = self.folder.read_json(MANIFEST, missing={})
        self.data.update(name=name, grid=grid)
        self.data.setdefault("cells", {})

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def add(self, cell: Cell, defense_keys: list[str]) -> None:
        """Register a cell of the current grid (keeping what an earlier launch recorded)."""
        entry = self.cells.setdefault(cell.id, {"status": "pending", "attempts": 0})
        entry.update(label=cell.label, axes=cell.axes, case=cell.case, seed=cell.seed,
                     run_dir=f"runs/{cell.id}", in_grid=True)
        entry["defenses"] = {k: entry.get("defenses", {}).get(k, "pending")
                             for k in defense_keys}

    def retire_others(self, current: set[str]) -> None:
        """Cells of earlier versions of the grid stay listed (their folders are kept) but
        are no longer part of it."""
        for cell_id, entry in self.cells.items():
            if cell_id not in current:
                entry["in_grid"] = False

    def update(self, outcome: CellOutcome) -> None:
        entry = self.cells[outcome.cell_id]
        entry.update(status=outcome.status, error=outcome.error,
                     seconds=round(outcome.seconds, 2))
        entry["attempts"] = entry.get("attempts", 0) + 1
        entry["defenses"].update(outcome.defenses)

    def mark(self, cell_id: str, status: str) -> None:
        self.cells[cell_id]["status"] = status

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in self.cells.values():
            if entry.get("in_grid"):
                out[entry["status"]] = out.get(entry["status"], 0) + 1
        return out

    def save(self) -> None:
        self.data["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
        self.data["counts"] = self.counts()
        self.folder.write_json(MANIFEST, self.data)
