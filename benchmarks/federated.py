"""Federated benchmark: one model-replacement attacker against FedAvg and each robust
aggregator, on the standard MNIST split (8,000 train / 2,000 test).

Setup: simple_net, 20 participants with IID shares, 10 sampled per round, 2 local epochs
of SGD (lr 0.02, momentum 0.9, batch 64), eta = N / K = 2 (so FedAvg's new global model
is the mean of the local models). A global model is first trained clean with FedAvg for
`--warmup` rounds; every aggregator then starts from it: one clean round, one attack
round, `--after` clean rounds. In the attack round the first sampled participant
batch-poisons half of each local batch with the pattern trigger (-> 8) for 20 local
epochs at lr 0.01 and multiplies its update by N / eta = 10 (model replacement).

Targets: FedAvg ASR >= 90% right after the attack round; norm clipping, Krum, Multi-Krum
and FLAME keep ASR <= 20% in every round from the attack on, with clean accuracy within
3 points of FedAvg without an attack in each of those rounds. Also measured: the cost of
a round, and of 100 clients per round against 10 clients with the same data.

    python benchmarks/federated.py [--warmup 20] [--after 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, mnist_split_dir  # noqa: E402

from backdoors.config import from_dict  # noqa: E402
from backdoors.experiment import run  # noqa: E402
from backdoors.runs import RunFolder  # noqa: E402

RULES: dict[str, dict[str, Any]] = {
    "FedAvg": {"name": "fedavg"},
    "norm clipping (median norm)": {"name": "norm_clipping"},
    "weak DP (median clip, noise 0.001)": {"name": "weak_dp"},
    "median": {"name": "median"},
    "trimmed mean (beta 0.1)": {"name": "trimmed_mean"},
    "Krum (f=1)": {"name": "krum"},
    "Multi-Krum (f=1, keep 9)": {"name": "multi_krum"},
    "FLAME": {"name": "flame"},
    "FoolsGold (head)": {"name": "foolsgold", "features": "head"},
}
TARGETED = ("norm_clipping", "krum", "multi_krum", "flame")
ATTACK_ROUND = 2


def config(data_dir: Path, aggregator: dict, rounds: int, attack: bool,
           pretrained: str | None, seed: int, participants: int = 20,
           per_round: int = 10) -> dict:
    return {
        "name": f"fl-{aggregator['name']}", "seed": seed,
        "task": {"name": "mnist", "data_dir": str(data_dir)},
        "model": {"name": "simple_net"},
        "train": {"lr": 0.02, "batch_size": 64, "test_batch_size": 500, "momentum": 0.9,
                  "weight_decay": 5e-4, "tensorboard": False, "progress": False,
                  "pretrained": pretrained},
        "synthesizer": {"name": "pattern", "target": 8},
        "attack": {"name": "batch", "fraction": 0.5},
        "federated": {
            "rounds": rounds, "participants": participants, "per_round": per_round,
            "local_epochs": 2, "eta": participants / per_round,
            "adversaries": 1 if attack else 0,
            "attack_round": ATTACK_ROUND if attack else None,
            "weight_scale": float(per_round),  # N / eta = K
            "attacker_local_epochs": 20, "attacker_lr": 0.01, "aggregator": aggregator,
        },
    }


def rounds_of(summary: dict) -> list[dict]:
    return [r for r in RunFolder(Path(summary["run_dir"])).rows() if r["kind"] == "round"]


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=20, help="clean FedAvg rounds first")
    parser.add_argument("--after", type=int, default=3, help="clean rounds after the attack")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated aggregator names")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/federated.md")
    args = parser.parse_args()
    data_dir = mnist_split_dir()
    rules = {k: v for k, v in RULES.items()
             if args.only is None or v["name"] in args.only.split(",")}
    total = ATTACK_ROUND + args.after
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        warm = run(from_dict(config(data_dir, {"name": "fedavg"}, args.warmup, False, None,
                                    args.seed)), out=tmp, quiet=True)
        warm_s = time.perf_counter() - start
        weights = str(Path(warm["run_dir"]) / "checkpoints" / "last.safetensors")
        print(f"warm-up: {args.warmup} FedAvg rounds -> clean "
              f"{pct(warm['clean_accuracy'])}% ({warm_s:.0f}s)", flush=True)
        base = rounds_of(run(from_dict(config(data_dir, {"name": "fedavg"}, total, False,
                                              weights, args.seed)), out=tmp, quiet=True))
        print("FedAvg, no attack: " + "  ".join(
            f"r{r['round']} {pct(r['clean_accuracy'])}/{pct(r['asr'])}" for r in base),
            flush=True)
        for label, agg in rules.items():
            rows = rounds_of(run(from_dict(config(data_dir, agg, total, True, weights,
                                                  args.seed)), out=tmp, quiet=True))
            results[label] = rows
            print(f"{label}: " + "  ".join(
                f"r{r['round']} {pct(r['clean_accuracy'])}/{pct(r['asr'])}" for r in rows),
                flush=True)
        cost = round_cost(data_dir, weights, args.seed, tmp)
    text = report(args, warm, base, results, rules, cost)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


def round_cost(data_dir: Path, weights: str, seed: int, tmp: str) -> dict[str, dict]:
    """One clean round with 100 clients of 80 samples against 10 clients of 800, batch 40:
    the same samples and the same number of steps, so the difference is per-client setup."""
    out = {}
    for n in (10, 100):
        cfg = config(data_dir, {"name": "fedavg"}, 1, False, weights, seed, participants=n,
                     per_round=n)
        cfg["train"]["batch_size"] = 40
        row = rounds_of(run(from_dict(cfg), out=tmp, quiet=True))[0]
        out[f"{n} clients x {8000 // n} samples"] = row
        print(f"cost, {n} clients: round {row['round_seconds']:.1f}s, local training "
              f"{row['local_train_seconds']:.1f}s", flush=True)
    return out


def report(args: argparse.Namespace, warm: dict, base: list[dict],
           results: dict[str, list[dict]], rules: dict[str, dict],
           cost: dict[str, dict]) -> str:
    total = ATTACK_ROUND + args.after
    heads = [f"round {r}" + (" (attack)" if r == ATTACK_ROUND else "")
             for r in range(1, total + 1)]
    lines = [
        f"MNIST split 8k/2k, simple_net; 20 participants (IID), 10 per round, 2 local "
        f"epochs, lr 0.02, eta 2; warm-up {args.warmup} clean FedAvg rounds (clean "
        f"{pct(warm['clean_accuracy'])}%); seed {args.seed}; {machine()}",
        "",
        f"Attack in round {ATTACK_ROUND}: one attacker, pattern trigger (-> 8), batch "
        "poisoning of half of each local batch, 20 local epochs at lr 0.01, update x10 "
        "(= N / eta, model replacement). Cells: clean accuracy / ASR (%).",
        "",
        "| aggregator | " + " | ".join(heads) + " | attacker flagged | precision / recall "
        "| aggregate s |",
        "| --- | " + " | ".join("---" for _ in heads) + " | --- | --- | --- |",
        "| FedAvg, no attack | " + " | ".join(
            f"{pct(r['clean_accuracy'])} / {pct(r['asr'])}" for r in base) + " | - | - | "
        f"{statistics.mean(r['aggregate_seconds'] for r in base):.3f} |",
    ]
    for label, rows in results.items():
        hit = next(r for r in rows if r["attackers"])
        i = hit["participants"].index(hit["attackers"][0])
        flagged = "n/a" if hit["flagged"] is None else ("yes" if hit["flagged"][i] else "no")
        det = hit["detection"]
        pr = "-" if det is None else f"{pct(det['precision'])} / {pct(det['recall'])}"
        lines.append(f"| {label} | " + " | ".join(
            f"{pct(r['clean_accuracy'])} / {pct(r['asr'])}" for r in rows)
            + f" | {flagged} | {pr} | "
            f"{statistics.mean(r['aggregate_seconds'] for r in rows):.3f} |")
    lines += ["", "Targets:"]
    lines += targets(base, results, rules)
    attack_rows = [r for rows in results.values() for r in rows]
    mean = lambda key, rows: statistics.mean(r[key] for r in rows)  # noqa: E731
    lines += [
        "",
        "Cost of a round (mean over all rounds above): "
        f"{mean('round_seconds', attack_rows):.1f}s, of which local training "
        f"{mean('local_train_seconds', attack_rows):.1f}s, client setup "
        f"{mean('train_seconds', attack_rows) - mean('local_train_seconds', attack_rows):.2f}s, "
        f"aggregation {mean('aggregate_seconds', attack_rows):.3f}s, evaluation "
        f"{mean('eval_seconds', attack_rows):.1f}s. Attack rounds also train the attacker "
        "for 20 epochs.",
        "",
        "| one clean round (batch 40, 200 steps per local epoch in all) | round s | "
        "local training s | client setup s |",
        "| --- | --- | --- | --- |",
    ]
    for label, row in cost.items():
        setup = row["train_seconds"] - row["local_train_seconds"]
        lines.append(f"| {label} | {row['round_seconds']:.1f} | "
                     f"{row['local_train_seconds']:.1f} | {setup:.2f} |")
    return "\n".join(lines)


def targets(base: list[dict], results: dict[str, list[dict]], rules: dict[str, dict]
            ) -> list[str]:
    out = []
    by_name = {rules[label]["name"]: rows for label, rows in results.items()}
    if "fedavg" in by_name:
        asr = by_name["fedavg"][ATTACK_ROUND - 1]["asr"]
        out.append(f"- FedAvg ASR right after the attack round: {pct(asr)}% (target >= 90%): "
                   f"{'met' if asr >= 0.9 else 'NOT met'}")
    for name in TARGETED:
        if name not in by_name:
            continue
        rows = by_name[name][ATTACK_ROUND - 1:]
        worst_asr = max(r["asr"] for r in rows)
        gap = min(r["clean_accuracy"] - b["clean_accuracy"]
                  for r, b in zip(rows, base[ATTACK_ROUND - 1:], strict=True))
        ok = worst_asr <= 0.2 and gap >= -0.03
        out.append(f"- {name}: max ASR from the attack on {pct(worst_asr)}% (target <= 20%), "
                   f"worst clean gap to FedAvg without attack {100 * gap:+.1f} pts "
                   f"(target >= -3): {'met' if ok else 'NOT met'}")
    return out


if __name__ == "__main__":
    main()
