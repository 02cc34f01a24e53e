"""Who holds which data and who is sampled when: the participants of a federated run.

Every random choice of round r (who is sampled, each client's shuffling, the server's
noise) is drawn from a stream keyed by (seed, round, participant) (seeds.py), so a
resumed run repeats an uninterrupted one without saving generator states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from backdoors.attacks.base import Attack
from backdoors.config import FederatedConfig
from backdoors.data.dataset import ArrayDataset
from backdoors.errors import ConfigError
from backdoors.federated.partition import dirichlet_split, iid_split
from backdoors.seeds import PARTITION, POISON, SAMPLE, stream


def split(train: ArrayDataset, fc: FederatedConfig, seed: int) -> list[Tensor]:
    """Each participant's training-set indices."""
    gen = stream(seed, PARTITION)
    if fc.split == "dirichlet":
        return dirichlet_split(train.labels, fc.participants, fc.alpha, gen)
    return iid_split(len(train), fc.participants, gen)


def sample_round(fc: FederatedConfig, seed: int, round_: int) -> tuple[list[int], list[bool]]:
    """The participants of a round, in sampling order, and which of them attack.

    As in Backdoors 101: with `attack_round` the first `adversaries` sampled participants
    attack in that round only; otherwise ids 0..adversaries-1 attack whenever sampled in
    an attack round (`FederatedConfig.attacks_in`). With `attackers_per_round` m, the
    first m sampled participants of an attack round are replaced by compromised ones
    (drawn from the same round stream) and only they attack, so every attack round has
    exactly m attackers.
    """
    gen = stream(seed, SAMPLE, round_)
    order = torch.randperm(fc.participants, generator=gen)
    sampled = order[: fc.per_round].tolist()
    attacking = fc.attacks_in(round_)
    if fc.attack_round is not None:
        return sampled, [attacking and i < fc.adversaries for i in range(len(sampled))]
    if attacking and fc.attackers_per_round is not None:
        evil = torch.randperm(fc.adversaries, generator=gen)[: fc.attackers_per_round].tolist()
        rest = [pid for pid in sampled if pid not in evil]
        sampled = evil + rest[: fc.per_round - len(evil)]
        # Exactly m attack: other compromised participants sampled this round train
        # honestly, so the attack strength does not vary with the draw.
        return sampled, [i < len(evil) for i in range(len(sampled))]
    return sampled, [attacking and pid < fc.adversaries for pid in sampled]


@dataclass
class Population:
    """Every participant's local data (on the training device) and training-set indices,
    plus the poisoned local sets of the compromised ones, made on first use (on the CPU,
    like the centralized training set, then moved)."""

    train: ArrayDataset
    indices: list[Tensor]
    injection: Callable[[int], Attack]  # participant id -> its injection attack
    seed: int
    device: torch.device
    poisoned: dict[int, tuple[ArrayDataset, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        on_device = self.train.to(self.device) if self.device.type != "cpu" else self.train
        self.data = [on_device.subset(p.to(self.device)) for p in self.indices]

    def attacker_data(self, pid: int) -> ArrayDataset:
        if pid not in self.poisoned:
            local = self.train.subset(self.indices[pid])
            attack = self.injection(pid)
            ds, idx = attack.poison_training_set(local, stream(self.seed, POISON, pid))
            if not isinstance(ds, ArrayDataset):
                raise ConfigError(f"attack '{attack.name}' gave a streaming dataset; "
                                  "federated clients need in-memory data")
            on_device = ds.to(self.device) if self.device.type != "cpu" else ds
            self.poisoned[pid] = (on_device, self.indices[pid][idx.cpu()])
        return self.poisoned[pid][0]

    def attackers(self) -> list[int]:
        """Compromised participants that have trained so far."""
        return sorted(self.poisoned)

    def poison_rows(self) -> Tensor:
        """Training-set rows poisoned by any attacker so far, sorted."""
        found = [idx for _, idx in self.poisoned.values()]
        return torch.cat(found).sort().values if found else torch.empty(0, dtype=torch.long)
