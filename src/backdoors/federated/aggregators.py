"""Server-side aggregators: thin registered adapters around the rules in `aggregation.py`.

Every aggregator turns the round's K flattened client updates into the change of the
global parameters, and says how it treated each client. The server step is the Backdoors
101 one (arXiv 1807.00459): global += eta * K / N * A(updates), N the population size and
A the rule's estimate of the mean update; for the plain mean this is eta / N * sum(updates),
and eta = N / K makes the new global model the average of the local models (FedAvg).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from backdoors.federated import aggregation as rules
from backdoors.registry import Registry

AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


@dataclass
class RoundContext:
    """What an aggregator may know besides the updates: the server learning rate, the
    population size, who sent each update and how many samples it trained on."""

    eta: float
    participants: int
    ids: Tensor
    samples: Tensor
    generator: torch.Generator = field(default_factory=torch.Generator)
    head: slice | None = None  # the classifier head's entries in a flattened update

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

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def check(self, per_round: int) -> None:  # noqa: B027 - most rules take any K
        """Raise ValueError when the rule cannot work with `per_round` updates."""

    @abstractmethod
    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        """updates: [K, P] flattened client updates (local - global)."""

    def state_dict(self) -> dict[str, Tensor]:
        """State kept across rounds (for resume); most rules keep none."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:  # noqa: B027 - stateless
        """Restore what `state_dict` returned."""


def _uniform(like: Tensor) -> Tensor:
    """1/K for each of the K rows of `like`, on its device."""
    return torch.full((len(like),), 1.0 / len(like), dtype=like.dtype, device=like.device)


@AGGREGATORS.register("original")
class Original(Aggregator):
    """Backdoors 101's rule: global += eta / N * sum of the updates (arXiv 1807.00459).

    "How To Backdoor Federated Learning" (Bagdasaryan et al.); no defense."""

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        delta = rules.original_sum(updates, ctx.eta, ctx.participants)
        return Aggregate(delta, _uniform(updates))


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator):
    """FedAvg: the sample-weighted mean update (McMahan et al., arXiv 1602.05629).

    Weighted by local sample counts (`weighted: true`, default) or plain (`false`, the same
    as `original`), through the server step. No defense."""

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        if not self.weighted or float(ctx.samples.sum()) == 0:
            w = _uniform(updates)
        else:
            w = ctx.samples.to(updates.device, updates.dtype) / float(ctx.samples.sum())
        return Aggregate(ctx.step(rules.mean(updates, w), k), w)


def _bound(updates: Tensor, bound: float | None) -> float:
    """A fixed norm bound, or (None) the median norm of this round's updates."""
    return float(updates.norm(dim=1).median()) if bound is None else bound


@AGGREGATORS.register("norm_clipping")
class NormClipping(Aggregator):
    """Norm clipping: bound each update's L2 norm, then average (arXiv 1911.07963).

    Sun et al., "Can You Really Backdoor Federated Learning?": every update is scaled down
    to L2 norm <= `bound`; `bound` null (default) uses the median norm of the round's
    updates. Flags clipped updates."""

    flags_clients = True

    def __init__(self, bound: float | None = None) -> None:
        if bound is not None and bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self.bound = bound

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        clipped, scale = rules.clip_norms(updates, _bound(updates, self.bound))
        return Aggregate(ctx.step(clipped.mean(0), k), scale / k, scale < 1)


@AGGREGATORS.register("weak_dp")
class WeakDP(Aggregator):
    """Weak DP: clip each update, average, add Gaussian noise (arXiv 1911.07963).

    Sun et al.; Backdoors 101's fl_diff_privacy. Each update is clipped to `clip` (null:
    the round's median norm), the server step applied, then Gaussian noise of std `noise`
    (default 0.001) added to every coordinate. Flags clipped updates."""

    flags_clients = True

    def __init__(self, clip: float | None = None, noise: float = 0.001) -> None:
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.clip, self.noise = clip, noise

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        clipped, scale = rules.clip_norms(updates, _bound(updates, self.clip))
        noisy = rules.add_gaussian_noise(ctx.step(clipped.mean(0), k), self.noise,
                                         ctx.generator)
        return Aggregate(noisy, scale / k, scale < 1)


@AGGREGATORS.register("median")
class Median(Aggregator):
    """Coordinate-wise median (Yin et al., arXiv 1803.01498).

    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"."""

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        return Aggregate(ctx.step(rules.median(updates), len(updates)))


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., arXiv 1803.01498).

    Drops the floor(beta * K) largest and smallest values of each coordinate (default
    beta 0.1) and averages the rest."""

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def check(self, per_round: int) -> None:
        if 2 * int(self.beta * per_round) >= per_round:
            raise ValueError(f"beta {self.beta} trims all of {per_round} updates")

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        return Aggregate(ctx.step(rules.trimmed_mean(updates, self.beta), len(updates)))


@AGGREGATORS.register("multi_krum")
class MultiKrum(Aggregator):
    """Multi-Krum: the mean of the updates with the lowest Krum scores (arXiv 1703.02757).

    Blanchard et al., NeurIPS 2017: averages the `keep` updates (default K - f) with the
    lowest scores, f = `byzantine` (default 1). Flags the updates it leaves out."""

    flags_clients = True

    def __init__(self, byzantine: int = 1, keep: int | None = None) -> None:
        if byzantine < 0:
            raise ValueError(f"byzantine must be >= 0, got {byzantine}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.byzantine, self.keep = byzantine, keep

    def _keep(self, k: int) -> int:
        return min(k, self.keep if self.keep is not None else k - self.byzantine)

    def check(self, per_round: int) -> None:
        if per_round <= self.byzantine + 2:
            raise ValueError(f"Krum needs more than byzantine + 2 = {self.byzantine + 2} "
                             f"updates per round, got {per_round}")

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        mean_kept, kept = rules.multi_krum(updates, self.byzantine, self._keep(k))
        coef = torch.zeros(k, dtype=updates.dtype, device=updates.device)
        coef[kept] = 1.0 / len(kept)
        return Aggregate(ctx.step(mean_kept, k), coef, coef == 0)


@AGGREGATORS.register("krum")
class Krum(MultiKrum):
    """Krum: the one update closest to its neighbours (Blanchard et al., arXiv 1703.02757).

    The update with the lowest score (sum of squared distances to its K - f - 2 nearest
    updates), f = `byzantine` (default 1). Flags every other update."""

    def __init__(self, byzantine: int = 1) -> None:
        super().__init__(byzantine, keep=1)


@AGGREGATORS.register("flame")
class Flame(Aggregator):
    """FLAME: cosine clustering, median-norm clipping and noise (arXiv 2101.02281).

    Nguyen et al., USENIX Security 2022: HDBSCAN on cosine distances keeps the majority
    cluster, kept updates are clipped to the median norm, and Gaussian noise of std
    `noise_factor` (default 0.001) x that norm is added. Flags the updates outside the
    majority cluster."""

    flags_clients = True

    def __init__(self, noise_factor: float = 0.001) -> None:
        if noise_factor < 0:
            raise ValueError(f"noise_factor must be >= 0, got {noise_factor}")
        self.noise_factor = noise_factor

    def check(self, per_round: int) -> None:
        if per_round < 3:
            raise ValueError(f"FLAME needs at least 3 updates per round, got {per_round}")

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        agg, kept = rules.flame(updates, self.noise_factor, ctx.generator)
        bound = float(updates.norm(dim=1).median())
        scale = (bound / updates[kept].norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
        coef = torch.zeros(k, dtype=updates.dtype, device=updates.device)
        coef[kept] = scale.to(updates.dtype) / len(kept)
        flagged = torch.ones(k, dtype=torch.bool, device=updates.device)
        flagged[kept] = False
        return Aggregate(ctx.step(agg, k), coef, flagged)


@AGGREGATORS.register("foolsgold")
class FoolsGold(Aggregator):
    """FoolsGold: down-weight clients whose update histories look alike (arXiv 1808.04866).

    Fung et al., "The Limitations of Federated Learning in Sybil Settings": each
    participant's accumulated past updates are compared by cosine similarity; clients that
    keep pushing the same direction as another get weights near 0.
    `features`: all parameters (default) or only the classifier `head` (the paper's choice
    for deep models; it also keeps the N x P history small). `confidence` is the logit's
    kappa (default 1). Flags clients weighted below `flag_below` (default 0.5)."""

    flags_clients = True

    def __init__(self, confidence: float = 1.0, features: Literal["all", "head"] = "all",
                 flag_below: float = 0.5) -> None:
        if confidence <= 0:
            raise ValueError(f"confidence must be > 0, got {confidence}")
        self.confidence, self.features, self.flag_below = confidence, features, flag_below
        self.history: dict[int, Tensor] = {}

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        part = updates if self.features == "all" or ctx.head is None else updates[:, ctx.head]
        rows = []
        for pid, u in zip(ctx.ids.tolist(), part, strict=True):
            past = self.history.get(pid)
            self.history[pid] = u.detach().cpu().clone() if past is None else past + u.cpu()
            rows.append(self.history[pid])
        w = rules.foolsgold_weights(torch.stack(rows), self.confidence)
        w = w.to(updates.device, updates.dtype)
        coef = w / w.sum().clamp(min=1e-12)
        return Aggregate(ctx.step(rules.mean(updates, w), k), coef, w < self.flag_below)

    def state_dict(self) -> dict[str, Tensor]:
        return {str(pid): h for pid, h in self.history.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.history = {int(pid): h for pid, h in state.items()}
