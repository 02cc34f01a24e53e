"""Attack x defense tables: each cell the mean +- 95% CI over seeds of one figure, with
BackdoorBench's published value next to it where it has the same setting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backdoors.report.collect import Record
from backdoors.report.reference import lookup
from backdoors.report.stats import Estimate, estimate

NO_DEFENSE = "no defense"
Figure = Callable[[Record, str], float | None]


@dataclass
class Table:
    """Rows are attacks (sweep cells without their seed), columns defenses."""

    key: str
    title: str
    scale: float  # 100 for fractions shown in %
    digits: int
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Estimate | None] = field(default_factory=dict)
    reference: dict[tuple[str, str], float] = field(default_factory=dict)

    def text(self, row: str, column: str) -> str:
        """'97.3 ± 0.4 (n=3)', with the published value and the difference if known."""
        est = self.cells.get((row, column))
        if est is None:
            return "-"
        value = f"{self.scale * est.mean:.{self.digits}f}"
        if est.half_width is not None:
            value += f" ± {self.scale * est.half_width:.{self.digits}f}"
        value += f" (n={est.n})"
        ref = self.reference.get((row, column))
        if ref is not None:
            value += f" · ref {self.scale * ref:.{self.digits}f} " \
                     f"({self.scale * (est.mean - ref):+.{self.digits}f})"
        return value


def _after(metric: str) -> Figure:
    def get(record: Record, column: str) -> float | None:
        if column == NO_DEFENSE:
            return record.summary.get(metric)
        return (record.defenses.get(column, {}).get("after") or {}).get(metric)
    return get


def _defense(key: str) -> Figure:
    return lambda r, c: None if c == NO_DEFENSE else r.defenses.get(c, {}).get(key)


def _seconds(record: Record, column: str) -> float | None:
    if column != NO_DEFENSE:
        return record.defenses.get(column, {}).get("seconds")
    s = record.summary
    per, units = (s.get("seconds_per_epoch"), s.get("epochs")) if "epochs" in s else (
        s.get("seconds_per_round"), s.get("rounds"))
    return None if per is None or units is None else per * units


# (key, title, figure, scale, digits, compared with BackdoorBench)
SPECS: list[tuple[str, str, Figure, float, int, bool]] = [
    ("clean_accuracy", "Clean accuracy (%)", _after("clean_accuracy"), 100, 1, True),
    ("asr", "Attack success rate (%)", _after("asr"), 100, 1, True),
    ("robust_accuracy", "Robust accuracy (%)", _after("robust_accuracy"), 100, 1, True),
    ("der", "Defense effectiveness rating (DER, 0.5 = no effect)", _defense("der"), 1, 3,
     False),
    ("auroc", "Detection AUROC", _defense("auroc"), 1, 3, False),
    ("tpr_at_5_fpr", "Detection TPR at 5% FPR (%)", _defense("tpr_at_5_fpr"), 100, 1, False),
    ("seconds", "Cost: seconds (attack: training; defense: the defense)", _seconds, 1, 1,
     False),
    ("peak_memory_mb", "Cost: peak memory of the defense (MB)", _defense("peak_memory_mb"), 1,
     0, False),
]


def tables(records: list[Record]) -> list[Table]:
    """Every table that has at least one value."""
    rows = list(dict.fromkeys(r.row for r in records))
    columns = [NO_DEFENSE, *dict.fromkeys(k for r in records for k in r.defenses)]
    by_row = {row: [r for r in records if r.row == row] for row in rows}
    out = []
    for key, title, figure, scale, digits, compared in SPECS:
        table = Table(key, title, scale, digits, rows, columns)
        for row in rows:
            for column in columns:
                table.cells[(row, column)] = estimate(figure(r, column) for r in by_row[row])
                if compared and table.cells[(row, column)] is not None:
                    ref = _reference(by_row[row][0], column, key)
                    if ref is not None:
                        table.reference[(row, column)] = ref
        if any(v is not None for v in table.cells.values()):
            out.append(table)
    return out


def _reference(record: Record, column: str, metric: str) -> float | None:
    name = None if column == NO_DEFENSE else record.defenses.get(column, {}).get("defense")
    found = lookup(record.config, name)
    return None if found is None else found.get(metric)


def column_label(records: list[Record], column: str) -> str:
    """A defense column's heading: its name and the options it ran with."""
    for r in records:
        result: dict[str, Any] = r.defenses.get(column, {})
        if result:
            options = result.get("options") or {}
            extra = ", ".join(f"{k}={v}" for k, v in options.items())
            return f"{result.get('defense', column)}" + (f" ({extra})" if extra else "")
    return column
