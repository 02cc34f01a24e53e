"""Reports as Markdown, CSV (one line per cell) or one self-contained HTML file (tables,
and figures inlined as PNG data, so it opens offline anywhere)."""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io

from backdoors.report import figures
from backdoors.report.collect import Record
from backdoors.report.reference import SOURCE
from backdoors.report.tables import Table, column_label
from backdoors.version import __version__

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem}h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;
border-bottom:1px solid #ddd}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ref{color:#777;
font-size:.75rem}.note{color:#555;font-size:.85rem}img{max-width:100%;margin:.5rem 0}
"""


def _labels(records: list[Record], tables: list[Table]) -> dict[str, str]:
    columns = tables[0].columns if tables else []
    return {c: column_label(records, c) for c in columns}


def markdown(records: list[Record], tables: list[Table], notes: list[str]) -> str:
    labels = _labels(records, tables)
    out = [f"# Report: {len(records)} runs, {len({r.row for r in records})} attacks", ""]
    for table in tables:
        out += [f"## {table.title}", "", "| attack | " + " | ".join(
            labels.get(c, c) for c in table.columns) + " |",
            "|" + " --- |" * (len(table.columns) + 1)]
        out += ["| " + " | ".join([row, *(table.text(row, c) for c in table.columns)]) + " |"
                for row in table.rows]
        if table.reference:
            out += ["", f"ref: {SOURCE}; the difference is this project's mean minus it."]
        out.append("")
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def csv_text(tables: list[Table]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["table", "attack", "defense", "mean", "ci95_half_width", "n",
                     "reference", "difference"])
    for table in tables:
        for (row, column), est in table.cells.items():
            if est is None:
                continue
            ref = table.reference.get((row, column))
            writer.writerow([table.key, row, column, est.mean, est.half_width, est.n,
                             ref, None if ref is None else est.mean - ref])
    return buffer.getvalue()


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(table: Table, labels: dict[str, str]) -> str:
    head = "".join(f"<th>{html.escape(labels.get(c, c))}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for column in table.columns:
            text = table.text(row, column)
            main, _, ref = text.partition(" · ")
            cells.append(f"<td>{html.escape(main)}" +
                         (f'<br><span class="ref">{html.escape(ref)}</span>' if ref else "")
                         + "</td>")
        body.append(f"<tr><td>{html.escape(row)}</td>{''.join(cells)}</tr>")
    note = (f'<p class="note">ref: {html.escape(SOURCE)}; the difference is this '
            "project's mean minus it.</p>" if table.reference else "")
    return (f"<h2>{html.escape(table.title)}</h2><table><tr><th>attack</th>{head}</tr>"
            f"{''.join(body)}</table>{note}")


def html_page(records: list[Record], tables: list[Table], notes: list[str]) -> str:
    labels = _labels(records, tables)
    by_key = {t.key: t for t in tables}
    parts = [f"<h1>backdoors report: {len(records)} runs, "
             f"{len({r.row for r in records})} attacks, "
             f"{len(tables[0].columns) - 1 if tables else 0} defenses</h1>",
             f'<p class="note">Each cell: mean ± 95% confidence interval over seeds '
             f"(Student t; n = seeds). Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by "
             f"backdoors {__version__}.</p>"]
    parts += [_html_table(t, labels) for t in tables]
    parts.append("<h2>Heatmaps</h2>")
    for key, cmap in (("asr", "Reds"), ("clean_accuracy", "Greens")):
        if key in by_key:
            parts.append(_img(figures.heatmap(by_key[key], labels, cmap), f"{key} heatmap"))
    parts += ["<h2>Training curves</h2>", _img(figures.curves(records), "training curves")]
    drawn = [(c, png) for c in (tables[0].columns[1:] if tables else [])
             if (png := figures.histograms(records, c, labels.get(c, c))) is not None]
    if drawn:
        parts.append("<h2>Detection scores</h2>")
        parts += [_img(png, f"{c} scores") for c, png in drawn]
    if notes:
        parts.append("<h2>Left out</h2><ul>" + "".join(
            f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>backdoors report</title><style>" + CSS + "</style></head><body>"
            + "\n".join(p for p in parts if p) + "</body></html>\n")
