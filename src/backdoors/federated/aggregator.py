"""The aggregator interface: what a server-side rule receives and returns.

Every aggregator turns the round's K flattened client updates into the change of the
global parameters, and says how it treated each client. The server step is the Backdoors
101 one (arXiv 1807.00459): global += eta * K / N * A(updates), N the population size and
A the rule's estimate of the mean update; for the plain mean this is eta / N * sum(updates),
and eta = N / K makes the new global model the average of the local models (FedAvg).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from backdoors.registry import Registry

if TYPE_CHECKING:
    from backdoors.federated.server import ServerView

AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


@dataclass
class RoundContext:
    """What an aggregator may know besides the updates: the server learning rate, the
    population size, who sent each update, how many samples it trained on, the round and
    the server's own view (server.py)."""

    eta: float
    participants: int
    ids: Tensor
    samples: Tensor
    generator: torch.Generator = field(default_factory=torch.Generator)
    head: slice | None = None  # the classifier head's entries in a flattened update
    round: int = 0
    # The server's own abilities (root data, scratch models); None where the caller has
    # none (unit tests of pure rules). Rules that need it declare `needs_server`.
    server: ServerView | None = None
    last: int = 0  # the run's last round (0: unknown), for rules that report at the end

    def step(self, mean_update: Tensor, k: int) -> Tensor:
        """The server step for a mean-like aggregate of k updates."""
        return mean_update * (self.eta * k / self.participants)


@dataclass
class Aggregate:
    """The change of the global parameters and how each update was treated.

    `coefficients[i]`: update i's weight in the (linear) aggregate, e.g. 1/K for the mean,
    0 for a rejected update; None for coordinate-wise rules (median, trimmed mean).
    `flagged[i]`: rejected or down-weighted by the rule; None for rules that never judge
    clients. `accepted` clients' batch-norm statistics enter the new global model.
    """

    delta: Tensor
    coefficients: Tensor | None = None
    flagged: Tensor | None = None

    @property
    def accepted(self) -> Tensor | None:
        """Clients not flagged (None: all of them)."""
        return None if self.flagged is None else ~self.flagged


class Aggregator(ABC):
    """Base class. `flags_clients` says whether the rule rejects or down-weights clients
    (so that detection precision and recall mean something for it)."""

    flags_clients: ClassVar[bool] = False
    needs_server: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def check(self, per_round: int) -> None:  # noqa: B027 - most rules take any K
        """Raise ValueError when the rule cannot work with `per_round` updates."""

    def before_round(self, ctx: RoundContext) -> Tensor | None:
        """Called before the round's clients train (`ctx.samples` is not known yet):
        return parameters to replace the global model the clients start from and the
        aggregate is added to (BackdoorIndicator plants its indicator), or None (default)
        to leave it."""
        return None

    @abstractmethod
    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        """updates: [K, P] flattened client updates (local - global)."""

    def report(self, ctx: RoundContext) -> dict[str, float]:
        """Extra figures for the round's row, asked after aggregation (e.g. CRFL's
        certificate, the share of coordinates RLR flipped); most rules have none."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """State kept across rounds (for resume); most rules keep none."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:  # noqa: B027 - stateless
        """Restore what `state_dict` returned."""
