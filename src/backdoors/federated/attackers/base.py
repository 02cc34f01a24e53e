"""The federated attacker interface: what a compromised client does around local training.

The config's synthesizer says what the trigger is and its `attack` (injection: data,
batch, blind, ...) how poisoned samples enter the loss; the attacker
(`federated.attacker`) says what a compromised client does with that in a federated
round: which trigger part it uses (DBA), how its update is constrained during and after
training (PGD, Neurotoxin) and how it is scaled (model replacement). Clients may run in
other processes (the Ray engine), so everything a client-side method reads from the
server side travels in `round_state`, set in the main process by `observe`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from backdoors.attacks.base import Attack
from backdoors.config import FederatedConfig
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.registry import Registry
from backdoors.synthesizers.base import Synthesizer

if TYPE_CHECKING:
    from backdoors.federated.clients import ClientReport, LocalPlan, LocalTraining
    from backdoors.federated.updates import FlatModel

ATTACKERS: Registry[Attacker] = Registry("federated attacker")


@dataclass
class AttackerSetup:
    """What an attacker is bound to. `make_attack(s)` is the config's injection method bound
    to synthesizer `s` (DBA binds one per trigger part)."""

    fc: FederatedConfig
    synthesizer: Synthesizer
    attack: Attack
    make_attack: Callable[[Synthesizer], Attack]
    flat_size: int
    head: slice | None
    seed: int


class Attacker:
    """Model replacement is the base behaviour: train with the injection method on the
    client's poisoned local data and multiply the update by `federated.weight_scale`.
    Subclasses override the hooks they need."""

    setup: AttackerSetup

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def bind(self, setup: AttackerSetup) -> None:
        """Called once in every process that trains clients."""
        self.setup = setup

    def injection(self, pid: int) -> Attack:
        """The injection attack participant `pid` trains (and poisons its data) with."""
        return self.setup.attack

    def begin(self, pid: int, round_: int, start: Tensor, model: nn.Module) -> None:  # noqa: B027
        """Before a compromised client's local training from the global `start`."""

    def after_step(self, flat: FlatModel, start: Tensor) -> None:  # noqa: B027
        """After every optimizer step of a compromised client (projections, masks)."""

    def train(self, local: LocalTraining, data: ArrayDataset, start: tuple[Tensor, Tensor],
              plan: LocalPlan, generator: torch.Generator, update_out: Tensor
              ) -> ClientReport:
        """A compromised client's local training; the default is the honest loop with
        `after_step` after every optimizer step."""
        return local.train(data, start, plan, generator, update_out,
                           after_step=lambda: self.after_step(local.flat, start[0]))

    def finish(self, update: Tensor, pid: int, round_: int) -> None:
        """Turn the trained update (in place) into the one sent: scaled by weight_scale."""
        update.mul_(self.setup.fc.weight_scale)

    def observe(self, round_: int, old_global: Tensor, new_global: Tensor) -> None:  # noqa: B027
        """In the main process after each round's aggregation (all rounds, attacked or
        not): e.g. Neurotoxin reads the global change."""

    def round_state(self) -> dict[str, Any]:
        """What clients need from `observe`, shipped to every client process each round."""
        return {}

    def load_round_state(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore `round_state` in a client process."""

    def evaluate(self, model: nn.Module, test_loader: Loader,
                 generator: torch.Generator) -> dict[str, float]:
        """Extra per-round metrics of the global model (e.g. ASR per trigger part)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Main-process state for resume (by default the round state)."""
        return self.round_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_round_state(state)


@ATTACKERS.register("model_replacement")
class ModelReplacement(Attacker):
    """Model replacement ("How To Backdoor Federated Learning", Bagdasaryan et al., AISTATS
    2020, arXiv 1807.00459): the compromised client trains on its poisoned data and
    scales its update by `federated.weight_scale` (about N / eta replaces the global
    model); weight_scale 1 is plain data poisoning."""
