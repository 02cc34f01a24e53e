"""Judge a defense matrix (a sweep folder) against the bar of the defense catalogue issue.

Per defense and attack it takes the mean over seeds (with its 95% interval) of what the
bar looks at, and says whether the bar holds for that attack:

- detectors (input and dataset stages): AUROC >= 0.9;
- repairs, and training-time defenses (judged by the model they train): ASR < 20% at a
  clean-accuracy cost of at most 5 points against the attacked model;
- training-time defenses and sanitisers are not judged on attacks whose training set holds
  no poisoned row (batch injection);
- inspectors: the attack's target class flagged in every seed.

A defense meets the bar when it holds on at least two attacks (`--need`). The table goes
to stdout or `--out` as markdown; `backdoors report` has the full figures.

    python benchmarks/defense_bar.py runs/mnist_catalogue2 --out bar.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backdoors.report.collect import Record, collect
from backdoors.report.stats import Estimate, estimate
from backdoors.report.tables import column_label

AUROC_BAR, ASR_BAR, COST_BAR = 0.9, 0.2, 0.05
REPAIRING = ("repair", "training")


def cost(result: dict[str, Any]) -> float | None:
    """Clean-accuracy points lost (as a fraction; negative = gained)."""
    before, after = result.get("before") or {}, result.get("after") or {}
    if before.get("clean_accuracy") is None or after.get("clean_accuracy") is None:
        return None
    return before["clean_accuracy"] - after["clean_accuracy"]


def flagged_target(result: dict[str, Any], target: int) -> float | None:
    """1 when the inspector named the target class, else 0."""
    if "target_flagged" in result:
        return float(bool(result["target_flagged"]))
    if "detected_class" in result:
        return float(result.get("backdoored", True) and result["detected_class"] == target)
    return None


def target_of(record: Record) -> int:
    return int((record.config.get("synthesizer") or {}).get("target", 0))


def figure(records: list[Record], key: str,
           get: Callable[[Record, dict[str, Any]], float | None]) -> Estimate | None:
    return estimate(get(r, r.defenses[key]) for r in records if key in r.defenses)


def pct(e: Estimate | None) -> str:
    if e is None:
        return "-"
    return f"{100 * e.mean:.1f}" + ("" if e.half_width is None else f" ± {100 * e.half_width:.1f}")


def judge(records: list[Record], key: str) -> tuple[str, bool | None]:
    """The cell text and whether the bar holds (None: nothing to judge)."""
    stage = next(r.defenses[key]["stage"] for r in records if key in r.defenses)
    if stage in ("training", "dataset") and all(
            not r.summary.get("poisoned_samples") for r in records):
        # A batch-injected attack leaves no poisoned row: retraining on the set is clean by
        # construction and a sanitiser has nothing to find, so there is nothing to judge.
        return "no poisoned rows", None
    if stage in REPAIRING:
        asr = figure(records, key, lambda r, d: (d.get("after") or {}).get("asr"))
        lost = figure(records, key, lambda r, d: cost(d))
        if asr is None or lost is None:
            return "-", None
        ok = asr.mean < ASR_BAR and lost.mean <= COST_BAR
        text = f"ASR {pct(asr)}, cost {pct(lost)} pts"
        auroc = figure(records, key, lambda r, d: d.get("auroc"))
        if auroc is not None:
            text += f" (AUROC {auroc.mean:.3f})"
        return text, ok
    if stage == "inspection":
        hit = figure(records, key, lambda r, d: flagged_target(d, target_of(r)))
        if hit is None:
            return "-", None
        return f"target flagged in {round(hit.mean * hit.n)} of {hit.n}", hit.mean == 1.0
    auroc = figure(records, key, lambda r, d: d.get("auroc"))
    if auroc is None:
        return "-", None
    half = "" if auroc.half_width is None else f" ± {auroc.half_width:.3f}"
    return f"AUROC {auroc.mean:.3f}{half}", auroc.mean >= AUROC_BAR


def table(records: list[Record], need: int) -> str:
    attacks = list(dict.fromkeys(r.row for r in records))
    keys = list(dict.fromkeys(k for r in records for k in r.defenses))
    by_attack = {a: [r for r in records if r.row == a] for a in attacks}
    lines = [f"| defense | {' | '.join(attacks)} | bar (>= {need} of {len(attacks)}) |",
             "| --- |" + " --- |" * (len(attacks) + 1)]
    for key in keys:
        cells, held = [], 0
        for attack in attacks:
            rows = [r for r in by_attack[attack] if key in r.defenses]
            if not rows:
                cells.append("-")
                continue
            text, ok = judge(rows, key)
            held += bool(ok)
            cells.append(f"{text} {'**yes**' if ok else 'no'}" if ok is not None else text)
        verdict = f"met ({held})" if held >= need else f"not met ({held})"
        lines.append(f"| {column_label(records, key)} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="sweep folders (or run folders)")
    parser.add_argument("--need", type=int, default=2, help="attacks the bar must hold on")
    parser.add_argument("--out", type=Path, help="markdown file (default: stdout)")
    args = parser.parse_args()
    records, notes = collect(args.paths)
    seeds = sorted({r.seed for r in records})
    text = (f"Runs: {len(records)} (seeds {', '.join(map(str, seeds))}); mean ± 95% interval "
            "over seeds (Student t).\n\n" + table(records, args.need))
    if notes:
        text += "\nLeft out: " + "; ".join(notes) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
