"""Aggregators that judge clients: Multi-Krum and Krum select the updates closest to the
others, FLAME clusters and clips them, FoolsGold down-weights clients that keep sending
similar updates. Thin registered adapters around the pure rules in `aggregation.py`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext


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
