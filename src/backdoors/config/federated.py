"""The `federated:` config section: population, rounds, attackers and the aggregator.

Its presence switches `backdoors train` to the federated simulation (see
docs/federated.md). The local optimiser (lr, momentum, weight decay, batch size, device)
comes from `train`; `train.epochs` is not used, `rounds` counts the rounds.
"""

from __future__ import annotations

import dataclasses
import math
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

    attacker: what a compromised client does with its local training (a component of
    federated ATTACKERS, default model_replacement: scale the update by weight_scale).
    Attack timing: attack_window [first, last] limits the rounds in which compromised
    clients attack (default every round after warmup_rounds); attack_fraction spreads the
    attack over that fraction of the window's rounds, evenly; attackers_per_round forces
    that many compromised clients into every attack round (the first ones sampled are
    replaced), as attack_round does for its single round. warmup_rounds: benign rounds
    before any attack. engine: local (clients one after another) or ray (clients as Ray
    tasks on `workers` actors with client_cpus CPU threads and client_gpus GPUs each, on
    a local Ray or the cluster at ray_address).
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
    attacker: Component = field(default_factory=lambda: Component("model_replacement"))
    attack_window: list[int] | None = None
    attack_fraction: float | None = None
    attackers_per_round: int | None = None
    warmup_rounds: int = 0
    engine: Literal["local", "ray"] = "local"
    workers: int = 2
    ray_address: str | None = None
    client_cpus: float = 1.0
    client_gpus: float = 0.0

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
        self._check_timing()
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"federated.engine must be local or ray, got {self.engine!r}")
        if self.workers < 1:
            raise ConfigError(f"federated.workers must be >= 1, got {self.workers}")
        if self.client_cpus <= 0 or self.client_gpus < 0:
            raise ConfigError("federated.client_cpus must be > 0 and client_gpus >= 0, got "
                              f"{self.client_cpus} and {self.client_gpus}")

    def _check_timing(self) -> None:
        if not 0 <= self.warmup_rounds < self.rounds:
            raise ConfigError(f"federated.warmup_rounds must be in [0, rounds={self.rounds}), "
                              f"got {self.warmup_rounds}")
        window = self.attack_window
        if window is not None and (len(window) != 2 or not 1 <= window[0] <= window[1]):
            raise ConfigError("federated.attack_window must be [first, last] with "
                              f"1 <= first <= last, got {window}")
        # An attack scheduled only inside the warm-up would silently never happen.
        if self.attack_round is not None and self.attack_round <= self.warmup_rounds:
            raise ConfigError(f"federated.attack_round ({self.attack_round}) must come after "
                              f"the warm-up rounds (warmup_rounds={self.warmup_rounds})")
        if window is not None and window[1] <= self.warmup_rounds:
            raise ConfigError(f"federated.attack_window {window} ends within the warm-up "
                              f"rounds (warmup_rounds={self.warmup_rounds}); it must end after")
        if self.attack_fraction is not None and not 0 < self.attack_fraction <= 1:
            raise ConfigError("federated.attack_fraction must be in (0, 1], got "
                              f"{self.attack_fraction}")
        forced = self.attackers_per_round
        if forced is not None and not 1 <= forced <= min(self.per_round, self.adversaries):
            raise ConfigError("federated.attackers_per_round must be in [1, min(per_round, "
                              f"adversaries)={min(self.per_round, self.adversaries)}], got "
                              f"{forced}")
        if self.attack_round is not None and (window is not None
                                              or self.attack_fraction is not None):
            raise ConfigError("federated.attack_round is one attack round; it cannot be "
                              "combined with attack_window or attack_fraction")

    def attacks_in(self, round_: int) -> bool:
        """Whether compromised clients attack in `round_` (the timing above)."""
        if round_ <= self.warmup_rounds:
            return False
        if self.attack_round is not None:
            return round_ == self.attack_round
        first, last = self.attack_window or (self.warmup_rounds + 1, self.rounds)
        if not first <= round_ <= last:
            return False
        if self.attack_fraction is None:
            return True
        # Evenly spread: round i of the window attacks when ceil(i * f) steps up, so a
        # fraction of 0.5 attacks every second round starting with the first. (Rounded
        # first: 0.1 * 10 is 1.0000000000000002 in floating point.)
        i = round_ - first
        f = self.attack_fraction
        return math.ceil(round((i + 1) * f, 9)) > math.ceil(round(i * f, 9))

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "aggregator": self.aggregator.as_dict(),
                "attacker": self.attacker.as_dict()}


def parse_federated(data: Any, where: str = "federated") -> FederatedConfig | None:
    """Validate the `federated:` mapping (unknown keys get a did-you-mean); None if absent.
    The aggregator's name and options are checked against its registry when the run is
    built."""
    if data is None:
        return None
    return parse_section(FederatedConfig, data, where,
                         {"aggregator": parse_component, "attacker": parse_component})


def check_federated_train(train: TrainConfig) -> None:
    """Refuse `train` options federated clients cannot honour."""
    if train.scheduler != "none":
        raise ConfigError(f"train.scheduler: federated clients train with the constant "
                          f"train.lr; set train.scheduler: none (got {train.scheduler})")
    if train.dp:
        raise ConfigError("train.dp: DP-SGD inside federated clients is not supported; "
                          "for server-side privacy use federated.aggregator: weak_dp")
