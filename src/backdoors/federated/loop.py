"""Federated learning with backdoor attackers as an inner loop of the run lifecycle
("How To Backdoor Federated Learning", Bagdasaryan et al., AISTATS 2020, arXiv
1807.00459; Backdoors 101's fl mode). One unit is one round.

A round: sample `per_round` of the `participants`; each trains `local_epochs` from the
global weights on its own share of the training set; compromised ones train with the
config's synthesizer and attack and multiply their update by `weight_scale`; the
aggregator turns the updates into the change of the global model; the global model is
evaluated (clean accuracy, ASR) and the round is logged with every update's norm, how the
aggregator treated it, and detection precision / recall against the known attackers.
The lifecycle (lifecycle/session.py) checkpoints, logs and summarises the rounds.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.attacks.base import Attack
from backdoors.config import FederatedConfig, TrainConfig
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.errors import Diverged
from backdoors.federated.aggregator import Aggregator, RoundContext
from backdoors.federated.clients import LocalPlan, LocalTraining
from backdoors.federated.outputs import RoundConsole, detection, federated_scalars
from backdoors.federated.outputs import summary_figures as round_summary
from backdoors.federated.population import Population, sample_round, split
from backdoors.federated.updates import FlatModel, mean_buffers
from backdoors.hooks import Hook
from backdoors.metrics import evaluate
from backdoors.seeds import CLIENT, EVAL, SERVER, stream
from backdoors.synthesizers.base import Synthesizer
from backdoors.training.optim import make_optimizer


class RoundLoop:
    """Plays rounds 1..fc.rounds: local training of the sampled clients, aggregation,
    evaluation. `honest` is the clients' plain training (the `none` attack)."""

    unit = "round"
    scalar_group = "Federated"
    steps_per_unit = 0  # clients' steps are not logged one by one

    def __init__(self, model: nn.Module, attack: Attack, honest: Attack,
                 synthesizer: Synthesizer, train: ArrayDataset, test_loader: Loader,
                 backdoor_loader: Loader | None, fc: FederatedConfig, tc: TrainConfig,
                 aggregator: Aggregator, seed: int, augment: bool, device: torch.device
                 ) -> None:
        self.fc, self.tc, self.seed, self.attack = fc, tc, seed, attack
        self.synthesizer, self.aggregator = synthesizer, aggregator
        self.test_loader, self.backdoor_loader = test_loader, backdoor_loader
        self.population = Population(train, split(train, fc, seed), attack, seed, device)
        self.flat = FlatModel(model)
        self.local = LocalTraining(self.flat, make_optimizer(model, tc), test_loader,
                                   tc.batch_size, device, augment, tc.max_batches)
        self.plans = (LocalPlan(honest, fc.local_epochs, tc.lr),
                      LocalPlan(attack, fc.attacker_local_epochs or fc.local_epochs,
                                fc.attacker_lr or tc.lr))
        # One [K, P] buffer for the round's updates, reused every round.
        self.updates = torch.empty(fc.per_round, self.flat.size, device=device)
        self.head = self.flat.head()
        self.first, self.last = 1, fc.rounds

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
        local_buffers, samples, losses, busy = self._train_clients(
            round_, sampled, bad, (global_params, global_buffers))
        trained = time.perf_counter()
        ctx = RoundContext(self.fc.eta, self.fc.participants, torch.tensor(sampled),
                           torch.tensor(samples), stream(self.seed, SERVER, round_), self.head)
        agg = self.aggregator.aggregate(self.updates, ctx)
        new_params = global_params + agg.delta
        if not bool(torch.isfinite(new_params).all()):
            raise Diverged(f"round {round_}", "the aggregated global model is not finite")
        new_buffers = mean_buffers(torch.stack(local_buffers), ctx.samples, agg.accepted,
                                   global_buffers)
        self.flat.write(new_params, new_buffers)
        aggregated = time.perf_counter()
        metrics = evaluate(self.flat.model, self.test_loader, self.synthesizer,
                           stream(self.seed, EVAL), self.backdoor_loader)
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
            **metrics,
            # train_seconds - local_train_seconds: the per-client setup cost.
            "train_seconds": trained - start, "local_train_seconds": busy,
            "aggregate_seconds": aggregated - trained,
            "eval_seconds": end - aggregated, "round_seconds": end - start,
        }

    def _train_clients(self, round_: int, sampled: list[int], bad: list[bool],
                       start: tuple[Tensor, Tensor]
                       ) -> tuple[list[Tensor], list[int], dict[str, list[float]], float]:
        """Local training of the round's clients from the global weights `start`; their
        updates land in self.updates."""
        local_buffers, samples, losses, busy = [], [], {}, 0.0
        for i, (pid, evil) in enumerate(zip(sampled, bad, strict=True)):
            data = self.population.attacker_data(pid) if evil else self.population.data[pid]
            try:
                report = self.local.train(data, start, self.plans[evil],
                                          stream(self.seed, CLIENT, round_, pid),
                                          self.updates[i])
            except Diverged as exc:
                raise Diverged(f"round {round_}, client {pid}, local {exc.where}",
                               exc.what) from None
            if evil:
                self.updates[i] *= self.fc.weight_scale  # model replacement boosting
            local_buffers.append(self.flat.read_buffers())
            samples.append(report.samples)
            busy += report.seconds
            for name, value in report.losses.items():
                losses.setdefault(name, []).append(value)
        return local_buffers, samples, losses, busy

    def scalars(self, row: dict[str, Any]) -> dict[str, float]:
        return federated_scalars(row)

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"aggregator": self.fc.aggregator.name}
        return {**out, **round_summary(rows)} if rows else out

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict(), "attack": self.attack.state_dict(),
                "attackers": self.population.attackers()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.attack.load_state_dict(state["attack"])
        for pid in state["attackers"]:  # re-made from their own seeded streams
            self.population.attacker_data(pid)
