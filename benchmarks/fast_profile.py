"""The fast CIFAR-10 victim profile (docs/fast_profile.md) on the real data: the clean and
the BadNets configs of configs/fast/, same seed, one after the other, on the shared
CIFAR-10 JPEG set (extracted once into .cache/).

For each it reports the final clean accuracy and ASR, the epochs, the wall time of the
whole run (data already decoded: setup, the whitening fit, training and every epoch's
evaluation) and of training alone, and the wall time until the first epoch whose test
accuracy reaches 85%, 90% and 93% ("-" if none did); then the learning curve, epoch by
epoch. The device is the configs' `auto` (CUDA when present, else CPU) unless --device.

    python benchmarks/fast_profile.py [--device cpu] [--epochs N] [--out FILE.md]

--epochs shortens the schedule (the lr still warms up and decays to 0 within it);
--max-train-samples and --max-test-samples keep the first N images (a smoke test, not a
measurement).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_overrides, machine, pct, table_row  # noqa: E402

from backdoors.assembly.build import build  # noqa: E402
from backdoors.config import load_config  # noqa: E402
from backdoors.experiment import run  # noqa: E402
from backdoors.hooks import Hook  # noqa: E402

CONFIGS = {"clean": REPO / "configs/fast/cifar10_clean.yaml",
           "badnets": REPO / "configs/fast/cifar10_badnets.yaml"}
THRESHOLDS = (0.85, 0.90, 0.93)


class Clock(Hook):
    """Wall seconds from the start of the run to the end of each epoch's evaluation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: nn.Module) -> None:
        self.rows.append({**row, "wall": time.perf_counter() - self.start})


def train(name: str, overrides: list[str], out: Path) -> Clock:
    config = load_config(CONFIGS[name], overrides)
    clock = Clock()
    run(config, out=out, name=name, hooks=[clock], quiet=True)
    return clock


def reached(rows: list[dict[str, Any]], threshold: float) -> str:
    first = next((r for r in rows if r["clean_accuracy"] >= threshold), None)
    return "-" if first is None else f"{first['wall']:.0f} s (epoch {first['epoch']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--epochs", type=int, default=None, help="shorter schedule")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the tables here (.md)")
    args = parser.parse_args()

    overrides = [*data_overrides(CONFIGS["clean"]), f"train.device={args.device}",
                 f"seed={args.seed}", "train.tensorboard=false", "train.progress=false"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    for key in ("max_train_samples", "max_test_samples"):
        if getattr(args, key) is not None:
            overrides.append(f"task.{key}={getattr(args, key)}")
    clocks: dict[str, Clock] = {}
    with tempfile.TemporaryDirectory(prefix="fast-profile-") as tmp:
        # Decode the JPEGs once before timing anything (cached as safetensors).
        build(load_config(CONFIGS["clean"], overrides)).task.train  # noqa: B018
        for name in CONFIGS:
            clocks[name] = train(name, overrides, Path(tmp))
            rows = clocks[name].rows
            print(f"{name}: clean {pct(rows[-1]['clean_accuracy'])}, ASR "
                  f"{pct(rows[-1]['asr'])}, {rows[-1]['wall']:.0f} s", flush=True)

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    subset = args.max_train_samples or args.max_test_samples
    title = (f"# Fast CIFAR-10 profile: {device}, {machine()}, seed {args.seed}"
             + (" (a subset of CIFAR-10: not a measurement)" if subset else ""))
    columns = ["config", "epochs", "clean accuracy", "ASR", "wall time", "training time",
               *[f"to {round(100 * t)}%" for t in THRESHOLDS]]
    summary = []
    for name, clock in clocks.items():
        rows, last = clock.rows, clock.rows[-1]
        summary.append(table_row(
            name, last["epoch"], pct(last["clean_accuracy"]), pct(last["asr"]),
            f"{last['wall']:.0f} s", f"{sum(r['train_seconds'] for r in rows):.0f} s",
            *[reached(rows, t) for t in THRESHOLDS]))
    curve_columns = ["epoch", *[f"{name} {what}" for name in clocks
                                for what in ("accuracy", "ASR", "wall")]]
    curve = [table_row(epoch, *[cell for clock in clocks.values()
                                for cell in (pct(clock.rows[epoch - 1]["clean_accuracy"]),
                                             pct(clock.rows[epoch - 1]["asr"]),
                                             f"{clock.rows[epoch - 1]['wall']:.0f} s")])
             for epoch in range(1, min(len(c.rows) for c in clocks.values()) + 1)]
    text = "\n".join([table_row(*columns), "|" + " --- |" * len(columns), *summary, "",
                      table_row(*curve_columns), "|" + " --- |" * len(curve_columns), *curve])
    print(f"\n{title}\n\n{text}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"{title}\n\n{text}\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
