"""Federated catalogue: every FL attacker against FedAvg and every aggregator, warm-started,
on the project's MNIST split (8,000 train / 2,000 test), with durability after the attack.

Setup (the literature's: 100 participants, 10 per round, a converged global model first):
simple_net; 100 participants with IID shares of 80 images, 10 sampled per round, 2 local
epochs of SGD (lr 0.02, momentum 0.9, batch 64); eta = N / K = 10, so FedAvg's new global
model is the mean of the local models. A global model is first trained clean with FedAvg
for `--warmup` rounds; every (attacker, aggregator) cell starts from it. Attack: the
pattern trigger (-> 8); participants 0..9 are compromised; in each round of the attack
window (rounds 2..1+`--attack-rounds`) one of them (DBA: four) is sampled
(federated.attackers_per_round) and batch-poisons half of each local batch for 30 local
epochs at lr 0.02 (with 80 images, fewer steps leave the attacker's own model predicting
the target for clean digits, and model replacement then breaks the global model); then
`--after` clean rounds measure how long the backdoor lasts. The
scale and bound of each attacker are in ATTACKERS below.

Reported per cell: clean accuracy and ASR after the last attack round, the worst clean gap
to FedAvg without attack over the attack window, ASR 1 / 5 / 10 / 20 rounds after the
attack, detection precision / recall pooled over rounds, and the mean round time.

    python benchmarks/fl_catalogue.py [--attackers a,b] [--aggregators x,y]
                                      [--pairs attacker:rule,...] [--out FILE.md]
                                      [--json FILE.json]

With `--json` the grid is resumable: the same command again keeps the cells the file
holds and runs the rest (the warm-up is retrained, identically, for a given seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, mnist_split_dir  # noqa: E402
from federated import pct, rounds_of  # noqa: E402

from backdoors.config import from_dict  # noqa: E402
from backdoors.errors import RunFailed  # noqa: E402
from backdoors.experiment import run  # noqa: E402

PARTICIPANTS, PER_ROUND = 100, 10
# Each attacker with the federated options it is run with: attackers per attack round and
# the update's scale. One model-replacement attacker scales by N / eta = 10; DBA's four
# part holders share that, 2.5 each, so their sum replaces the model as one would.
# Constrain-and-scale and PGD bound the sent norm by `bound` / `eps`; "auto" is the
# median benign update norm of the warm-up's last round (the attacker can measure it by
# training honestly once), i.e. what norm clipping at the median lets through; "server"
# is that bound against rules that clip updates and none against the others (the
# paper's attacker knows the server's bound S).
ATTACKERS: dict[str, dict[str, Any]] = {
    "model replacement": {"attacker": {"name": "model_replacement"}},
    "DBA (4 parts)": {"attacker": {"name": "dba"}, "attackers_per_round": 4,
                      "weight_scale": 2.5},
    "constrain-and-scale": {"attacker": {"name": "constrain_and_scale", "bound": "server"}},
    # A heavier anomaly term (1 - alpha = 0.7) keeps the backdoored model close enough to
    # the global one to carry a backdoor through a lenient fixed clipping bound.
    "constrain-and-scale, alpha 0.3": {"attacker": {"name": "constrain_and_scale",
                                                    "bound": "server", "alpha": 0.3},
                                       "key": "cs_alpha03"},
    "PGD + replacement": {"attacker": {"name": "pgd", "eps": "auto", "replacement": True}},
    "Neurotoxin": {"attacker": {"name": "neurotoxin"}},
    "Chameleon": {"attacker": {"name": "chameleon", "contrastive_epochs": 2}},
}
AGGREGATORS: dict[str, dict[str, Any]] = {
    "FedAvg": {"name": "fedavg"},
    "norm clipping": {"name": "norm_clipping"},
    # A lenient fixed bound, 15x the median benign norm: what constrain-and-scale aims at.
    "norm clipping, bound 3": {"name": "norm_clipping", "bound": 3.0, "key": "clip3"},
    "FLTrust": {"name": "fltrust"},
    "RLR": {"name": "rlr"},
    # RLR reverses the mean on weakly agreed coordinates, a boosted update included; the
    # wrapper bounds every update first (the composition the paper's code offers as --clip).
    "RLR inside norm clipping": {"name": "norm_clipping", "inner": {"name": "rlr"},
                                 "key": "rlr_clipped"},
    "DeepSight": {"name": "deepsight"},
    "FLAME": {"name": "flame"},
    "CRFL": {"name": "crfl"},
    "weak DP": {"name": "weak_dp"},
    "median": {"name": "median"},
    "trimmed mean": {"name": "trimmed_mean"},
    "Krum": {"name": "krum"},
    "Multi-Krum": {"name": "multi_krum"},
    "Bulyan": {"name": "bulyan"},
    "FoolsGold": {"name": "foolsgold", "features": "head"},
    "FLDetector": {"name": "fldetector"},
    "BackdoorIndicator": {"name": "indicator"},
    "centered clipping": {"name": "centered_clipping"},
}


# Rules that bound every update's norm (the bound a constrain-and-scale attacker aims at).
CLIPPING = {"norm_clipping", "clip3", "weak_dp", "flame", "rlr_clipped"}


def config(data_dir: Path, aggregator: dict, attacker: dict | None, rounds: int,
           pretrained: str | None, args: argparse.Namespace, norm: float = 1.0) -> dict:
    fed: dict[str, Any] = {
        "rounds": rounds, "participants": PARTICIPANTS, "per_round": PER_ROUND,
        "local_epochs": 2, "eta": PARTICIPANTS / PER_ROUND,
        "aggregator": {k: v for k, v in aggregator.items() if k != "key"},
    }
    if attacker is not None:
        bound = aggregator.get("bound", norm) if key(aggregator) in CLIPPING else None
        options = {k: norm if v == "auto" else bound if v == "server" else v
                   for k, v in attacker["attacker"].items()}
        fed.update({
            "adversaries": 10, "attacker": options,
            "attack_window": [2, 1 + args.attack_rounds],
            "attackers_per_round": attacker.get("attackers_per_round", 1),
            "weight_scale": attacker.get("weight_scale", PARTICIPANTS / fed["eta"]),
            "attacker_local_epochs": args.attacker_epochs, "attacker_lr": args.attacker_lr,
        })
    return {
        "name": f"fl-{key(aggregator)}", "seed": args.seed,
        "task": {"name": "mnist", "data_dir": str(data_dir)},
        "model": {"name": "simple_net"},
        "train": {"lr": 0.02, "batch_size": 64, "test_batch_size": 500, "momentum": 0.9,
                  "weight_decay": 5e-4, "tensorboard": False, "progress": False,
                  "pretrained": pretrained},
        "synthesizer": {"name": "pattern", "target": 8},
        "attack": {"name": "batch", "fraction": args.poison_fraction},
        "federated": fed,
    }


def key(aggregator: dict) -> str:
    """The name --aggregators and --pairs select an aggregator row by."""
    return aggregator.get("key", aggregator["name"])


def attacker_key(attacker: dict) -> str:
    """The name --attackers and --pairs select an attacker row by."""
    return attacker.get("key", attacker["attacker"]["name"])


def cell(rows: list[dict], summary: dict, base: list[dict], attack_rounds: int) -> dict:
    """The figures of one (attacker, aggregator) run."""
    window = [r for r in rows if 2 <= r["round"] <= 1 + attack_rounds]
    end = window[-1]
    gap = min(r["clean_accuracy"] - b["clean_accuracy"]
              for r, b in zip(window, base[1:1 + attack_rounds], strict=True))
    det = summary.get("detection")
    return {
        "clean": end["clean_accuracy"], "asr": end["asr"],
        "max_asr": max(r["asr"] for r in window),
        "gap": gap,
        "after": {k: summary.get(f"asr_{k}_rounds_after") for k in (1, 5, 10, 20)},
        "precision": None if det is None else det["precision"],
        "recall": None if det is None else det["recall"],
        "round_s": statistics.mean(r["round_seconds"] for r in rows),
        "extra": {k: v for k, v in end.items() if k.startswith("asr_part")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=30, help="clean FedAvg rounds first")
    parser.add_argument("--attack-rounds", type=int, default=5)
    parser.add_argument("--attacker-epochs", type=int, default=30)
    parser.add_argument("--attacker-lr", type=float, default=0.02)
    parser.add_argument("--poison-fraction", type=float, default=0.5,
                        help="share of each attacker batch that carries the trigger")
    parser.add_argument("--weights", default=None,
                        help="start the warm-up from this global model")
    parser.add_argument("--clean-bases", action="store_true",
                        help="also run every aggregator without an attack")
    parser.add_argument("--after", type=int, default=20, help="clean rounds after the attack")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--attackers", default=None, help="comma-separated attacker names")
    parser.add_argument("--aggregators", default=None, help="comma-separated rule names")
    parser.add_argument("--pairs", default=None,
                        help="only these attacker:aggregator cells, comma-separated")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write raw figures here after every cell; cells already "
                             "in this file are kept, not run again (a stopped grid resumes)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/fl_catalogue.md")
    args = parser.parse_args()
    data_dir = mnist_split_dir()
    attackers = {k: v for k, v in ATTACKERS.items()
                 if args.attackers is None or attacker_key(v) in args.attackers.split(",")}
    aggregators = {k: v for k, v in AGGREGATORS.items()
                   if args.aggregators is None or key(v) in args.aggregators.split(",")}
    total = 1 + args.attack_rounds + args.after
    results = earlier(args.json)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        warm = run(from_dict(config(data_dir, {"name": "fedavg"}, None, args.warmup,
                                    args.weights, args)), out=tmp, quiet=True)
        weights = str(Path(warm["run_dir"]) / "checkpoints" / "last.safetensors")
        norm = statistics.median(rounds_of(warm)[-1]["update_norms"])
        print(f"warm-up: {args.warmup} FedAvg rounds -> clean {pct(warm['clean_accuracy'])}% "
              f"({time.perf_counter() - start:.0f}s); median update norm {norm:.3f}", flush=True)
        base = rounds_of(run(from_dict(config(data_dir, {"name": "fedavg"}, None, total,
                                              weights, args)), out=tmp, quiet=True))
        clean_base = {label: rounds_of(run(from_dict(config(data_dir, agg, None, total,
                                                            weights, args)), out=tmp,
                                           quiet=True))
                      for label, agg in aggregators.items() if args.clean_bases}
        for label in clean_base:
            print(f"{label}, no attack: clean {pct(clean_base[label][-1]['clean_accuracy'])}",
                  flush=True)
        wanted = None if args.pairs is None else {
            tuple(pair.split(":")) for pair in args.pairs.split(",")}
        for a_label, attacker in attackers.items():
            for g_label, agg in aggregators.items():
                if wanted and (attacker_key(attacker), key(agg)) not in wanted:
                    continue
                if (a_label, g_label) in results:
                    print(f"{a_label} x {g_label}: kept from {args.json}", flush=True)
                    continue
                try:
                    summary = run(from_dict(config(data_dir, agg, attacker, total, weights,
                                                   args, norm)), out=tmp, quiet=True)
                except RunFailed as exc:  # one diverged cell does not end the grid
                    results[(a_label, g_label)] = {"failed": str(exc).split(" -> ")[0]}
                    print(f"{a_label} x {g_label}: {exc}", flush=True)
                    continue
                c = cell(rounds_of(summary), summary, base, args.attack_rounds)
                results[(a_label, g_label)] = c
                print(f"{a_label} x {g_label}: clean {pct(c['clean'])} ASR {pct(c['asr'])} "
                      f"(+20: {pct(c['after'][20])}) gap {100 * c['gap']:+.1f} "
                      f"P/R {pct(c['precision'])}/{pct(c['recall'])}", flush=True)
                # Written after every cell: a long grid stopped early keeps what it has.
                write(args, report(args, warm, norm, base, clean_base, results, attackers,
                                   aggregators), results)
    print(args.out.read_text() if args.out.exists() else "no cell ran")


def earlier(path: Path | None) -> dict[tuple[str, str], dict]:
    """The cells a previous invocation wrote to `path` (none if it does not exist yet)."""
    if path is None or not path.exists():
        return {}
    cells = {}
    for label, c in json.loads(path.read_text()).items():
        a_label, g_label = label.split(" x ", 1)
        if "after" in c:  # JSON turned the rounds-after keys into strings
            c["after"] = {int(k): v for k, v in c["after"].items()}
        cells[(a_label, g_label)] = c
    return cells


def write(args: argparse.Namespace, text: str, results: dict[tuple[str, str], dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({" x ".join(k): v for k, v in results.items()},
                                        indent=1))


def report(args: argparse.Namespace, warm: dict, norm: float, base: list[dict],
           clean_base: dict[str, list[dict]], results: dict[tuple[str, str], dict],
           attackers: dict, aggregators: dict) -> str:
    lines = [
        f"MNIST split 8k/2k, simple_net; {PARTICIPANTS} participants (IID, 80 images each), "
        f"{PER_ROUND} per round, 2 local epochs, lr 0.02, eta {PARTICIPANTS // PER_ROUND}; "
        f"warm-up {args.warmup} clean FedAvg rounds (clean {pct(warm['clean_accuracy'])}%); "
        f"attack window rounds 2-{1 + args.attack_rounds} (one attacker per round, DBA "
        f"four), then {args.after} clean rounds; the median benign update norm "
        f"(constrain-and-scale's bound, PGD's eps) {norm:.3f}; seed {args.seed}; "
        f"{machine()}.",
        "",
        "Clean accuracy of FedAvg without attack at the end: "
        + pct(base[-1]["clean_accuracy"]) + "%" + "".join(
            f", {label} {pct(rows[-1]['clean_accuracy'])}%"
            for label, rows in clean_base.items()) + ". The worst clean gap is to FedAvg "
        "without attack, round by round over the attack window.",
        "",
    ]
    for a_label in attackers:
        if not any((a_label, g) in results for g in aggregators):
            continue
        lines += [f"### {a_label}", "",
                  "| aggregator | clean / ASR after the attack | max ASR in the window | "
                  "worst clean gap (pts) | ASR +1 / +5 / +10 / +20 rounds | "
                  "precision / recall | round s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for g_label in aggregators:
            c = results.get((a_label, g_label))
            if c is None:
                continue
            if "failed" in c:
                lines.append(f"| {g_label} | {c['failed']} | | | | | |")
                continue
            after = " / ".join(pct(c["after"][k]) for k in (1, 5, 10, 20))
            extra = "".join(f" ({k} {pct(v)})" for k, v in c["extra"].items())
            lines.append(
                f"| {g_label} | {pct(c['clean'])} / {pct(c['asr'])}{extra} | "
                f"{pct(c['max_asr'])} | {100 * c['gap']:+.1f} | {after} | "
                f"{pct(c['precision'])} / {pct(c['recall'])} | {c['round_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
