"""The `federated:` config section: population, rounds, attackers and the aggregator.

Its presence switches `backdoors train` to the federated simulation (see
docs/federated.md). The local optimiser (lr, momentum, weight decay, batch size, device)
comes from `train`; `train.epochs` is not used, `rounds` counts the rounds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from backdoors.config.sections import Component, parse_component, parse_section
from backdoors.config.train import TrainConfig
from backdoors.errors import ConfigError


@dataclass(frozen=True)
class FederatedConfig:
    """Federated learning as in "How To Backdoor Federated Learning" (arXiv 1807.00459).

    participants: population size N; per_round: K sampled each round; split: iid or
    dirichlet (concentration `alpha`); eta: server learning rate (global += eta * K / N *
    aggregate); adversaries: compromised participants, the ids 0..adversaries-1 (attack
    whenever sampled) or, with attack_round, the first `adversaries` sampled in that round
    only; weight_scale multiplies a compromised update (model replacement needs about
    N / eta); attacker_local_epochs / attacker_lr: the attacker's own local training
    (default: the honest values). aggregator: a component of AGGREGATORS (default original).
    """

    rounds: int = 10
    participants: int = 100
    per_round: int = 10
    local_epochs: int = 2
    eta: float = 1.0
    split: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 0.9
    adversaries: int = 0
    attack_round: int | None = None
    weight_scale: float = 1.0
    attacker_local_epochs: int | None = None
    attacker_lr: float | None = None
    aggregator: Component = field(default_factory=lambda: Component("original"))

    def __post_init__(self) -> None:
        for key in ("rounds", "participants", "per_round", "local_epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"federated.{key} must be >= 1, got {getattr(self, key)}")
        if self.per_round > self.participants:
            raise ConfigError(f"federated.per_round ({self.per_round}) must be <= "
                              f"federated.participants ({self.participants})")
        if not 0 <= self.adversaries <= self.participants:
            raise ConfigError(f"federated.adversaries must be in [0, participants="
                              f"{self.participants}], got {self.adversaries}")
        for key in ("eta", "alpha", "weight_scale"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"federated.{key} must be > 0, got {getattr(self, key)}")
        if self.attack_round is not None:
            if self.attack_round < 1:
                raise ConfigError(f"federated.attack_round must be >= 1, got "
                                  f"{self.attack_round}")
            if not 1 <= self.adversaries <= self.per_round:
                raise ConfigError("federated.attack_round needs federated.adversaries in "
                                  f"[1, per_round={self.per_round}], got {self.adversaries}")
        if self.attacker_local_epochs is not None and self.attacker_local_epochs < 1:
            raise ConfigError("federated.attacker_local_epochs must be >= 1, got "
                              f"{self.attacker_local_epochs}")
        if self.attacker_lr is not None and self.attacker_lr <= 0:
            raise ConfigError(f"federated.attacker_lr must be > 0, got {self.attacker_lr}")

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "aggregator": self.aggregator.as_dict()}


def parse_federated(data: Any, where: str = "federated") -> FederatedConfig | None:
    """Validate the `federated:` mapping (unknown keys get a did-you-mean); None if absent.
    The aggregator's name and options are checked against its registry when the run is
    built."""
    if data is None:
        return None
    return parse_section(FederatedConfig, data, where, {"aggregator": parse_component})


def check_federated_train(train: TrainConfig) -> None:
    """Refuse `train` options federated clients cannot honour."""
    if train.scheduler != "none":
        raise ConfigError(f"train.scheduler: federated clients train with the constant "
                          f"train.lr; set train.scheduler: none (got {train.scheduler})")
    if train.dp:
        raise ConfigError("train.dp: DP-SGD inside federated clients is not supported; "
                          "for server-side privacy use federated.aggregator: weak_dp")
