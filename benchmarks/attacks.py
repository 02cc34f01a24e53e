"""Attack benchmark: every attack config on the standard MNIST split (8k/2k from
../shared/data) or, for colour-only attacks, a CIFAR-10 JPEG subset (CIFAR_BUDGET), for a
fixed budget.

Writes a Markdown table (clean accuracy, its change against clean training of the same
task, ASR, RA, per-backdoor figures, train seconds) to benchmarks/results/attacks.md.

    python benchmarks/attacks.py [--epochs 5] [--only blend,sig] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, data_overrides, machine, pct, table_row, write_table  # noqa: E402

from backdoors.assembly.build import build  # noqa: E402
from backdoors.assembly.data import training_data  # noqa: E402
from backdoors.config import Config, load_config  # noqa: E402
from backdoors.experiment import run  # noqa: E402
from backdoors.synthesizers import SYNTHESIZERS, Synthesizer  # noqa: E402

# Config files whose attack is benchmarked; legacy and demo files are not.
SKIP = {"quickstart.yaml", "mnist_params.yaml", "cifar10_params.yaml", "imagenet_params.yaml",
        "pipa_params.yaml", "cifar_fed.yaml"}
# Colour attacks run on a CIFAR-10 subset (the first images of the interleaved class
# folders, so classes stay balanced) with a narrow ResNet-18, to fit a CPU budget.
CIFAR_BUDGET = ["task.max_train_samples=10000", "task.max_test_samples=2000",
                "model.width=8", "train.epochs=6", "train.lr=0.05"]


def attack_configs(only: set[str] | None) -> list[Path]:
    # Federated and DP configs have their own benchmarks (federated.py, dp.py).
    paths = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name not in SKIP
                   and not p.name.startswith(("fl_", "dp_")))
    return [p for p in paths if only is None or p.stem in only]


def held_out(config: Config) -> tuple:
    """The clean rows a synthesizer takes out of the main task (semantic: the matching
    cars of both splits). A baseline only compares with runs that removed the same rows."""
    if SYNTHESIZERS.get(config.synthesizer.name).excluded is Synthesizer.excluded:
        return ()  # keeps every row: no need to load data or run prepare()
    comps = build(config)
    train_rows = len(training_data(config, comps, central=False).clean_train)  # prepare() picks
    test = comps.synthesizer.excluded(comps.task.test, "test")
    return (train_rows, () if test is None else tuple(sorted(test.tolist())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override every config's epochs")
    parser.add_argument("--only", default=None, help="comma-separated config names")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/attacks.md")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    rows: list[str] = []
    baselines: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in attack_configs(only):
            sets = data_overrides(path) + ["train.tensorboard=false", "train.progress=false"]
            if load_config(path).task.name == "cifar10":
                sets += CIFAR_BUDGET
            if args.epochs:
                sets.append(f"train.epochs={args.epochs}")
            config = load_config(path, sets)
            key = (config.task.name, repr(config.task.kwargs), repr(config.model),
                   config.train.epochs, held_out(config))
            if key not in baselines:
                clean = run(load_config(path, sets + ["attack={name: none}"]), out=tmp,
                            quiet=True)
                baselines[key] = clean["clean_accuracy"]
            start = time.perf_counter()
            s = run(config, out=tmp, quiet=True)
            seconds = time.perf_counter() - start
            delta = 100 * (s["clean_accuracy"] - baselines[key])
            extra = ", ".join(f"{n}: {100 * v['asr']:.1f}%" for n, v in
                              (s.get("variants") or {}).items())
            rows.append(table_row(path.stem, config.task.name, config.attack.name,
                                  pct(s["clean_accuracy"]), f"{delta:+.2f}", pct(s["asr"]),
                                  pct(s["robust_accuracy"]), extra or "-", f"{seconds:.0f}"))
            print(rows[-1], flush=True)
    write_table(args.out, f"Attack benchmark ({machine()}); clean-accuracy change is against "
                "clean training of the same task, model and budget.",
                ["config", "task", "injection", "clean acc", "vs clean (pts)", "ASR", "RA",
                 "per backdoor ASR", "train+eval s"], rows)


if __name__ == "__main__":
    main()
