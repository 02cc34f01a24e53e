"""Client engines: who trains a round's sampled clients. The local engine trains them one
after another in this process on one shared model; the Ray engine (ray_engine.py) spreads
them over worker processes. Both produce the same updates for the same seed: every
client's randomness comes from its own stream (seed, round, participant)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from backdoors.errors import Diverged
from backdoors.federated.attackers import Attacker
from backdoors.federated.clients import LocalPlan, LocalTraining
from backdoors.federated.population import Population
from backdoors.seeds import CLIENT, stream


@dataclass
class RoundResult:
    """The clients' float buffers, sample counts and losses, in sampling order, and the
    seconds spent in local training (summed over clients)."""

    buffers: list[Tensor] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    busy: float = 0.0


@dataclass
class ClientSide:
    """What trains clients in one process: the model (inside `local`), the participants'
    data, the honest and compromised plans and the bound attacker. Built in one place
    (assembly/loops.py::client_side) for the round loop and for every Ray worker."""

    population: Population
    local: LocalTraining
    plans: tuple[LocalPlan, LocalPlan]  # honest, compromised
    attacker: Attacker


class ClientEngine(Protocol):
    def train_round(self, round_: int, sampled: list[int], bad: list[bool],
                    start: tuple[Tensor, Tensor], updates_out: Tensor) -> RoundResult:
        """Train the round's clients from the global `start`; client i's update goes to
        updates_out[i]."""
        ...

    def close(self) -> None: ...


class LocalEngine:
    """Clients one after another on the one shared model and optimizer."""

    def __init__(self, clients: ClientSide) -> None:
        self.clients = clients

    def train_round(self, round_: int, sampled: list[int], bad: list[bool],
                    start: tuple[Tensor, Tensor], updates_out: Tensor) -> RoundResult:
        c, out = self.clients, RoundResult()
        for i, (pid, evil) in enumerate(zip(sampled, bad, strict=True)):
            out.buffers.append(train_client(c.population, c.local, c.attacker, c.plans, round_,
                                            pid, evil, start, updates_out[i], out))
        return out

    def close(self) -> None:
        """Nothing to release."""


def train_client(population: Population, local: LocalTraining, attacker: Attacker,
                 plans: tuple[LocalPlan, LocalPlan], round_: int, pid: int, evil: bool,
                 start: tuple[Tensor, Tensor], update_out: Tensor, out: RoundResult
                 ) -> Tensor:
    """Train one client into `update_out`, add its figures to `out`, return its float
    buffers. The one place a client's training is defined, for every engine."""
    generator = stream(population.seed, CLIENT, round_, pid)
    try:
        if evil:
            data = population.attacker_data(pid)
            plan = LocalPlan(attacker.injection(pid), plans[1].epochs, plans[1].lr)
            attacker.begin(pid, round_, start[0], local.flat.model)
            report = attacker.train(local, data, start, plan, generator, update_out)
            attacker.finish(update_out, pid, round_)
        else:
            report = local.train(population.data[pid], start, plans[0], generator, update_out)
    except Diverged as exc:
        raise Diverged(f"round {round_}, client {pid}, local {exc.where}", exc.what) from None
    out.samples.append(report.samples)
    out.busy += report.seconds
    for name, value in report.losses.items():
        out.losses.setdefault(name, []).append(value)
    return local.flat.read_buffers()
