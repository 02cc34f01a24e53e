"""`backdoors show RUN...`: one compact line per run (or per cell of a sweep folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backdoors.runs import RunFolder, is_locked
from backdoors.sweeps.manifest import MANIFEST

COLUMNS = ("run", "status", "epochs", "clean", "ASR", "RA", "best clean", "s/epoch", "defenses")


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"


def row(folder: RunFolder, name: str | None = None) -> list[str]:
    s = folder.read_summary()
    status = s.get("status", "not started")
    if status == "running" and not is_locked(folder.path):
        status = "killed (resume it)"
    per = s.get("seconds_per_epoch", s.get("seconds_per_round"))
    return [name or folder.path.name, status, str(s.get("epochs", s.get("rounds", "-"))),
            _pct(s.get("clean_accuracy")), _pct(s.get("asr")), _pct(s.get("robust_accuracy")),
            _pct(s.get("best_clean_accuracy")), "-" if per is None else f"{per:.1f}",
            ", ".join(s.get("defenses", {})) or "-"]


def show_table(paths: list[str | Path]) -> str:
    """An aligned text table of the runs (a sweep folder expands to its cells)."""
    lines = []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            cells = RunFolder(path).read_json(MANIFEST).get("cells", {})
            for cell_id, entry in cells.items():
                folder = RunFolder(path / entry.get("run_dir", f"runs/{cell_id}"))
                label = f"{entry.get('label')} s{entry.get('seed')}"
                lines.append(row(folder, label) if (folder.path / "config.yaml").is_file()
                             else [label, entry.get("status", "pending"), *["-"] * 7])
        else:
            lines.append(row(RunFolder.existing(path)))
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [list(COLUMNS), *lines])
