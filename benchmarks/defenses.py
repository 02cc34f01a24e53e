"""Defense matrix: attacks x defenses on the standard MNIST split (8k/2k, ../shared/data).

Trains each attack once (simple_net, the given epochs), runs every registered defense on
the finished run through the same runner as `backdoors defend`, and writes a Markdown
table with detection (AUROC, TPR at 5% FPR, flagged classes), mitigation (clean accuracy,
ASR and RA after, DER) and cost (seconds, peak memory) to benchmarks/results/defenses.md.

    python benchmarks/defenses.py [--epochs 3] [--attacks pattern_data,pattern_blind]
                                  [--defenses strip,fine_pruning] [--out FILE.md]
                                  [--set sentinet.n=16 ...]

The table is rewritten after every attack row, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, mnist_split_dir  # noqa: E402

from backdoors.assembly.artifact import defend  # noqa: E402
from backdoors.config import from_dict  # noqa: E402
from backdoors.defenses import DEFENSES  # noqa: E402
from backdoors.experiment import run  # noqa: E402

PATTERN = {"name": "pattern", "target": 0}
ATTACKS: dict[str, dict[str, Any]] = {
    "clean": {"synthesizer": PATTERN, "attack": {"name": "none"}},
    "pattern_data": {"synthesizer": PATTERN, "attack": {"name": "data", "ratio": 0.1}},
    "pattern_blind": {"synthesizer": PATTERN, "attack": {"name": "blind"}},
    "pattern_blind_nc_evasion": {
        "synthesizer": PATTERN,
        "attack": {"name": "blind", "loss_terms": ["normal", "backdoor", "neural_cleanse"]},
    },
}


def config(name: str, spec: dict[str, Any], epochs: int, data_dir: Path) -> dict[str, Any]:
    return {"name": name, "seed": 0, "task": {"name": "mnist", "data_dir": str(data_dir)},
            "model": {"name": "simple_net"},
            "train": {"epochs": epochs, "lr": 0.01, "tensorboard": False, "progress": False},
            **spec}


def cell(result: dict[str, Any]) -> str:
    pct = lambda v: "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"  # noqa: E731
    parts = []
    if "auroc" in result and math.isnan(result["auroc"]):
        parts.append("AUROC - (no poisoned samples)")
    elif "auroc" in result:
        parts.append(f"AUROC {result['auroc']:.2f}, TPR@5 {pct(result['tpr_at_5_fpr'])}")
    for key in ("removed", "isolated"):
        if key in result:
            parts.append(f"{key} {result[key]} (recall {pct(result[f'{key}_recall'])}, "
                         f"precision {pct(result[f'{key}_precision'])})")
    if "flagged_classes" in result:
        idx = result.get("target_anomaly_index")
        parts.append(f"flagged {result['flagged_classes']}" +
                     (f", AI(t) {idx:.1f}" if idx is not None else ""))
    if "after" in result:
        a = result["after"]
        parts.append(f"acc {pct(a['clean_accuracy'])} ASR {pct(a['asr'])} "
                     f"RA {pct(a['robust_accuracy'])} DER {result['der']:.2f}")
    parts.append(f"{result['seconds']:.0f}s {result['peak_memory_mb']:.0f}MB")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--defenses", default=",".join(DEFENSES.names()))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/defenses.md")
    parser.add_argument("--set", action="append", default=[], metavar="DEFENSE.KEY=VALUE",
                        help="a defense constructor argument, e.g. sentinet.n=16")
    args = parser.parse_args()
    kwargs = overrides(args.set)
    data_dir = mnist_split_dir()
    defenses = [d for d in args.defenses.split(",") if d]
    lines = [f"Defense matrix, MNIST split 8k/2k, simple_net, {args.epochs} epochs; "
             f"{machine()}", "",
             "| attack | before: acc / ASR / RA | " + " | ".join(defenses) + " |",
             "| --- | --- | " + " | ".join("---" for _ in defenses) + " |"]
    if kwargs:
        lines[1:1] = ["", "Defense settings other than the defaults: " + "; ".join(
            f"{d} {k}={v}" for d, kv in kwargs.items() for k, v in kv.items())]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.attacks.split(","):
            summary = run(from_dict(config(name, ATTACKS[name], args.epochs, data_dir)),
                          out=tmp, name=name, quiet=True)
            before = (f"{100 * summary['clean_accuracy']:.1f} / {100 * summary['asr']:.1f} / "
                      f"{100 * summary['robust_accuracy']:.1f}")
            cells = [cell(defend(Path(tmp) / name, d, kwargs.get(d))) for d in defenses]
            lines.append(f"| {name} | {before} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """{'sentinet': {'n': 16}} from ['sentinet.n=16']; values parsed as YAML scalars."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        defense, dot, arg = key.partition(".")
        if not (sep and dot and defense and arg):
            raise SystemExit(f"--set {item!r}: expected DEFENSE.KEY=VALUE, e.g. sentinet.n=16")
        out.setdefault(defense, {})[arg] = yaml.safe_load(value)
    return out


if __name__ == "__main__":
    main()
