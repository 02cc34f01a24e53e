"""Durability: Neurotoxin against the baseline attack, unboosted, over the attacker's
learning rate, on the federated catalogue's MNIST setup.

Neurotoxin (Zhang et al., ICML 2022, arXiv 2206.10341) claims that a backdoor planted in
the coordinates benign clients change least outlives the baseline attack once the
attacker stops. The authors' published commands run each attack at its own poison
learning rate (CIFAR: baseline 0.003, Neurotoxin 0.02; Reddit: 0.02 and 0.12), so this
benchmark measures both attacks over a range of attacker learning rates and reports,
next to the durability, what each costs in clean accuracy while it attacks (the stealth
a higher rate gives up).

Setup as `fl_catalogue.py` (100 participants, 10 a round, a 30-round FedAvg warm-up,
pattern trigger -> 8, 30 attacker epochs on half-poisoned batches) except: the update is
not boosted (weight_scale 1, as the paper's attacks), one attacker takes part in each of
`--attack-rounds` rounds (default 20), then `--after` clean rounds (default 20).

    python benchmarks/fl_durability.py [--lrs 0.02,0.04,0.06,0.12] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, mnist_split_dir  # noqa: E402
from federated import pct, rounds_of  # noqa: E402
from fl_catalogue import ATTACKERS, config  # noqa: E402

from backdoors.config import from_dict  # noqa: E402
from backdoors.experiment import run  # noqa: E402

COMPARED = ("model replacement", "Neurotoxin")


def row(rounds: list[dict], summary: dict, attack_rounds: int) -> dict:
    window = [r for r in rounds if 2 <= r["round"] <= 1 + attack_rounds]
    return {
        "min_clean": min(r["clean_accuracy"] for r in window),
        "clean_end": window[-1]["clean_accuracy"], "asr_end": window[-1]["asr"],
        "after": [summary.get(f"asr_{k}_rounds_after") for k in (1, 5, 10, 20)],
        "clean_last": rounds[-1]["clean_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="0.02,0.04,0.06,0.12", help="attacker learning rates")
    parser.add_argument("--attack-rounds", type=int, default=20)
    parser.add_argument("--after", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/fl_durability.md")
    args = parser.parse_args()
    args.attacker_epochs, args.poison_fraction = 30, 0.5
    data_dir = mnist_split_dir()
    lrs = [float(x) for x in args.lrs.split(",")]
    results: dict[tuple[str, float], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        args.attacker_lr = lrs[0]
        warm = run(from_dict(config(data_dir, {"name": "fedavg"}, None, args.warmup, None,
                                    args)), out=tmp, quiet=True)
        weights = str(Path(warm["run_dir"]) / "checkpoints" / "last.safetensors")
        print(f"warm-up: clean {pct(warm['clean_accuracy'])}% "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
        for lr in lrs:
            args.attacker_lr = lr
            for label in COMPARED:
                attacker = {**ATTACKERS[label], "weight_scale": 1.0}
                total = 1 + args.attack_rounds + args.after
                summary = run(from_dict(config(data_dir, {"name": "fedavg"}, attacker, total,
                                               weights, args)), out=tmp, quiet=True)
                results[(label, lr)] = r = row(rounds_of(summary), summary, args.attack_rounds)
                print(f"{label} lr {lr}: min clean {pct(r['min_clean'])} ASR "
                      f"{pct(r['asr_end'])} -> +20 {pct(r['after'][3])}", flush=True)
    lines = [
        "# Durability: Neurotoxin against the baseline attack (`benchmarks/fl_durability.py`)",
        "",
        f"MNIST split 8k/2k, simple_net, 100 participants (IID), 10 per round, FedAvg; "
        f"warm-up {args.warmup} rounds (clean {pct(warm['clean_accuracy'])}%); one unboosted "
        f"attacker (weight_scale 1) in each of rounds 2-{1 + args.attack_rounds}, 30 epochs "
        f"on half-poisoned batches, then {args.after} clean rounds; Neurotoxin masks the top "
        f"5% of its own benign gradient; seed {args.seed}; {machine()}.",
        "",
        "| attack | attacker lr | lowest clean acc in the window | clean / ASR at the end "
        "of the window | ASR +1 / +5 / +10 / +20 rounds | clean at the end |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (label, lr), r in results.items():
        lines.append(f"| {label} | {lr} | {pct(r['min_clean'])} | {pct(r['clean_end'])} / "
                     f"{pct(r['asr_end'])} | {' / '.join(pct(v) for v in r['after'])} | "
                     f"{pct(r['clean_last'])} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
