"""Federated learning with backdoor attackers as an inner loop of the run lifecycle
("How To Backdoor Federated Learning", Bagdasaryan et al., AISTATS 2020, arXiv
1807.00459; Backdoors 101's fl mode). One unit is one round.

A round: sample `per_round` of the `participants`; each trains `local_epochs` from the
global weights on its own share of the training set; compromised ones train with the
config's synthesizer and attack, shaped by the federated attacker (attackers/); the
aggregator turns the updates into the change of the global model; the global model is
evaluated (clean accuracy, ASR) and the round is logged with every update's norm, how the
aggregator treated it, and detection precision / recall against the known attackers.
The lifecycle (lifecycle/session.py) checkpoints, logs and summarises the rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from backdoors.attacks.base import Attack
from backdoors.config import FederatedConfig, TrainConfig
from backdoors.data.loader import Augment, Loader
from backdoors.errors import Diverged
from backdoors.federated.aggregator import Aggregator, RoundContext
from backdoors.federated.engine import ClientEngine, ClientSide, LocalEngine
from backdoors.federated.outputs import RoundConsole, detection, federated_scalars
from backdoors.federated.outputs import summary_figures as round_summary
from backdoors.federated.population import sample_round
from backdoors.federated.server import ServerView
from backdoors.federated.updates import mean_buffers
from backdoors.hooks import Hook
from backdoors.metrics import evaluate
from backdoors.seeds import EVAL, SERVER, stream
from backdoors.synthesizers.base import Synthesizer


class RoundLoop:
    """Plays rounds 1..fc.rounds: local training of the sampled clients, aggregation,
    evaluation. `clients` trains them in this process (assembly/loops.py::client_side);
    `engine` says who trains them (the local engine on `clients`, or Ray workers)."""

    unit = "round"
    scalar_group = "Federated"
    steps_per_unit = 0  # clients' steps are not logged one by one

    def __init__(self, clients: ClientSide, attack: Attack, synthesizer: Synthesizer,
                 test_loader: Loader, backdoor_loader: Loader | None, fc: FederatedConfig,
                 tc: TrainConfig, aggregator: Aggregator, seed: int,
                 augment: Augment | None, device: torch.device,
                 engine: Callable[[RoundLoop], ClientEngine] | None = None) -> None:
        self.fc, self.tc, self.seed, self.attack = fc, tc, seed, attack
        self.synthesizer, self.aggregator = synthesizer, aggregator
        self.test_loader, self.backdoor_loader = test_loader, backdoor_loader
        self.clients = clients
        self.flat = clients.local.flat  # the global model, shared with the local clients
        self.head = self.flat.head()
        self.attacker, self.population = clients.attacker, clients.population
        self.forward = clients.local.forward  # precision and compile, as the clients train
        self.server = ServerView(self.flat.model, self.population.train, clients.plans[0].attack,
                                 tc, test_loader, seed, augment, device) \
            if aggregator.needs_server else None
        # One [K, P] buffer for the round's updates, reused every round.
        self.updates = torch.empty(fc.per_round, self.flat.size, device=device)
        self.first, self.last = 1, fc.rounds
        self.engine = (engine or default_engine)(self)

    def global_step(self, round_: int) -> int:
        """TensorBoard's step of a round's scalars: the round itself."""
        return round_

    def console(self) -> Hook:
        return RoundConsole(self.last)

    def poison_rows(self) -> Tensor:
        """Training-set rows poisoned by the attackers that have trained so far."""
        return self.population.poison_rows()

    def start(self) -> None:
        """Nothing: each client starts the attack on its own weights (clients.py)."""

    def run_unit(self, round_: int, on_step: Any = None) -> dict[str, Any]:
        """Play one round; return its metrics.jsonl row."""
        start = time.perf_counter()
        sampled, bad = sample_round(self.fc, self.seed, round_)
        global_params, global_buffers = self.flat.read()
        if self.server is not None:
            self.server.set_global(global_params, global_buffers)
        ctx = RoundContext(self.fc.eta, self.fc.participants, torch.tensor(sampled),
                           torch.zeros(len(sampled), dtype=torch.long),
                           stream(self.seed, SERVER, round_), self.head, round_, self.server,
                           self.last)
        replaced = self.aggregator.before_round(ctx)
        if replaced is not None:  # the round starts from, and adds to, the rule's global
            global_params = replaced
            if self.server is not None:
                self.server.set_global(global_params, global_buffers)
        clients = self.engine.train_round(round_, sampled, bad,
                                          (global_params, global_buffers), self.updates)
        samples, losses, busy = clients.samples, clients.losses, clients.busy
        trained = time.perf_counter()
        ctx.samples = torch.tensor(samples)
        agg = self.aggregator.aggregate(self.updates, ctx)
        new_params = global_params + agg.delta
        if not bool(torch.isfinite(new_params).all()):
            raise Diverged(f"round {round_}", "the aggregated global model is not finite")
        new_buffers = mean_buffers(torch.stack(clients.buffers), ctx.samples, agg.accepted,
                                   global_buffers)
        self.flat.write(new_params, new_buffers)
        self.attacker.observe(round_, global_params, new_params)
        aggregated = time.perf_counter()
        metrics = evaluate(self.forward, self.test_loader, self.synthesizer,
                           stream(self.seed, EVAL), self.backdoor_loader)
        metrics.update(self.attacker.evaluate(self.flat.model, self.test_loader,
                                              stream(self.seed, EVAL)))
        end = time.perf_counter()
        flagged = None if agg.flagged is None else agg.flagged.cpu().tolist()
        return {
            "kind": "round", "round": round_, "epoch": round_, "lr": self.tc.lr,
            "participants": sampled,
            "attackers": [p for p, b in zip(sampled, bad, strict=True) if b],
            "samples": samples,
            "update_norms": self.updates.norm(dim=1).cpu().tolist(),
            "coefficients": None if agg.coefficients is None
            else agg.coefficients.cpu().tolist(),
            "flagged": flagged,
            "detection": detection(flagged, bad)
            if flagged is not None and self.aggregator.flags_clients else None,
            "train_loss": {k: sum(v) / len(v) for k, v in losses.items()},
            **metrics, **self.aggregator.report(ctx),
            # train_seconds - local_train_seconds: the per-client setup cost.
            "train_seconds": trained - start, "local_train_seconds": busy,
            "aggregate_seconds": aggregated - trained,
            "eval_seconds": end - aggregated, "round_seconds": end - start,
        }

    def scalars(self, row: dict[str, Any]) -> dict[str, float]:
        return federated_scalars(row)

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"aggregator": self.fc.aggregator.name, "attacker": self.fc.attacker.name}
        return {**out, **round_summary(rows)} if rows else out

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict(), "attack": self.attack.state_dict(),
                "attacker": self.attacker.state_dict(),
                "attackers": self.population.attackers()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.attack.load_state_dict(state["attack"])
        self.attacker.load_state_dict(state.get("attacker", {}))
        for pid in state["attackers"]:  # re-made from their own seeded streams
            self.population.attacker_data(pid)

    def close(self) -> None:
        """Release the client engine's workers."""
        self.engine.close()


def default_engine(loop: RoundLoop) -> ClientEngine:
    """Clients one after another in this process."""
    return LocalEngine(loop.clients)
