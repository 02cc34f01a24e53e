"""Ray client engine benchmark: the wall time of a federated round with 100 clients per
round, trained by the local engine (one after another in the run's process) and by the
Ray engine ("Ray: A Distributed Framework for Emerging AI Applications", Moritz et al.,
OSDI 2018, arXiv 1712.05889) with 1, 2 and 4 workers of one CPU each.

Task: the standard MNIST split (8,000 train / 2,000 test) with simple_net when
../shared/data/mnist-t10k exists, else the synthetic task with tiny_cnn; 100
participants, all 100 sampled every round, 2 local epochs of SGD (lr 0.02, batch 64),
FedAvg, no attacker (benchmarks/federated.py's setup at 100 clients). Each engine plays
`--rounds` rounds; the table gives the mean round time, the clients' share of it (the
part an engine can parallelise; evaluation runs in the driver) and the start-up cost
(Ray and its workers, each of which re-makes the task's data).

    python benchmarks/fl_ray.py [--rounds 3] [--workers 1,2,4] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, SHARED_DATA, machine, mnist_split_dir  # noqa: E402
from federated import config as mnist_config  # noqa: E402
from federated import rounds_of  # noqa: E402

from backdoors.config import from_dict  # noqa: E402
from backdoors.experiment import run  # noqa: E402

CLIENTS = 100


def task_config(rounds: int, seed: int) -> tuple[dict[str, Any], str]:
    """The benchmark's run config and a line describing its task."""
    if (SHARED_DATA / "mnist-t10k").is_dir():
        cfg = mnist_config(mnist_split_dir(), {"name": "fedavg"}, rounds, False, None, seed,
                           participants=CLIENTS, per_round=CLIENTS)
        return cfg, "MNIST split (8,000 train / 2,000 test), simple_net, 80 images a client"
    cfg = {"name": "fl-synthetic", "seed": seed,
           "task": {"name": "synthetic", "train_size": 8000, "test_size": 2000},
           "model": {"name": "tiny_cnn"},
           "train": {"lr": 0.02, "batch_size": 64, "tensorboard": False, "progress": False},
           "synthesizer": {"name": "pattern", "target": 1}, "attack": {"name": "none"},
           "federated": {"rounds": rounds, "participants": CLIENTS, "per_round": CLIENTS,
                         "local_epochs": 2, "eta": 1, "aggregator": {"name": "fedavg"}}}
    return cfg, "synthetic task (8,000 train / 2,000 test), tiny_cnn, 80 samples a client"


def measure(cfg: dict[str, Any], tmp: str, **engine: Any) -> dict[str, float]:
    """Play the config's rounds on an engine: mean round and client seconds, start-up."""
    cfg = {**cfg, "federated": {**cfg["federated"], **engine}}
    start = time.perf_counter()
    rows = rounds_of(run(from_dict(cfg), out=tmp, quiet=True))
    wall = time.perf_counter() - start
    rounds = [r["round_seconds"] for r in rows]
    return {"round": statistics.mean(rounds),
            "clients": statistics.mean(r["train_seconds"] for r in rows),
            "startup": wall - sum(rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/fl_ray.md")
    args = parser.parse_args()
    cfg, task = task_config(args.rounds, args.seed)
    threads = torch.get_num_threads()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The local engine at the process's threads, and at one thread like each worker.
        engines = [(f"local, {threads} threads", {}, threads), ("local, 1 thread", {}, 1)]
        engines += [(f"ray, {w} worker{'s' if w > 1 else ''} x 1 CPU",
                     {"engine": "ray", "workers": w, "client_cpus": 1}, threads)
                    for w in map(int, args.workers.split(","))]
        for label, engine, n in engines:
            torch.set_num_threads(n)
            results[label] = measure(cfg, tmp, **engine)
            torch.set_num_threads(threads)
            r = results[label]
            print(f"{label}: round {r['round']:.2f}s, clients {r['clients']:.2f}s, "
                  f"start-up {r['startup']:.1f}s", flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = report(results, task, args, f"{machine()}, {os.cpu_count()} cores, load average "
                  f"{load} (1, 5, 15 min) at the end")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


def report(results: dict[str, dict[str, float]], task: str, args: argparse.Namespace,
           where: str) -> str:
    """The table, with ratios against the local engine at one thread (each worker's
    thread count: the same arithmetic, so the same numbers)."""
    base = results["local, 1 thread"]
    lines = [f"{task}; {CLIENTS} participants, all {CLIENTS} sampled each round, 2 local "
             f"epochs, batch 64, FedAvg; {args.rounds} round(s) per engine, seed {args.seed}; "
             f"{where}.", "",
             "| engine | round s | vs local (1 thread) | clients s | vs local (1 thread) | "
             "start-up s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['round']:.2f} | {r['round'] / base['round']:.2f} | "
                     f"{r['clients']:.2f} | {r['clients'] / base['clients']:.2f} | "
                     f"{r['startup']:.1f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
