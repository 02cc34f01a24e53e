"""Reports over run folders: attack x defense tables (mean ± 95% CI over seeds, compared
with BackdoorBench where it has the setting), heatmaps, training curves, detection
histograms; Markdown, CSV or one self-contained HTML file. Reads run folders only."""

from __future__ import annotations

from pathlib import Path

from backdoors.errors import ConfigError
from backdoors.report.collect import collect
from backdoors.report.render import csv_text, html_page, markdown
from backdoors.report.tables import tables
from backdoors.runs.files import write_text

FORMATS = ("html", "md", "csv")


def report(paths: list[str | Path], out: str | Path | None = None,
           formats: tuple[str, ...] = ("html", "md")) -> list[Path]:
    """Write the report of the runs under `paths` in each format; return the files. `out`
    names the file (its suffix is replaced per format); default: report.* in the one
    folder given, else in the working directory."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format takes {', '.join(FORMATS)} (comma-separated), got "
                          f"{','.join(formats) or 'nothing'}")
    records, notes = collect(paths)
    found = tables(records)
    base = Path(out) if out else (Path(paths[0]) / "report" if len(paths) == 1 and
                                  Path(paths[0]).is_dir() else Path("report"))
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = base.with_suffix(f".{fmt}")
        text = {"html": lambda: html_page(records, found, notes),
                "md": lambda: markdown(records, found, notes),
                "csv": lambda: csv_text(found)}[fmt]()
        write_text(path, text)
        written.append(path)
    return written


__all__ = ["FORMATS", "report"]
