"""Neurotoxin: keep the backdoor out of the coordinates benign training changes most."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from backdoors.federated.attackers.base import ATTACKERS, ModelReplacement
from backdoors.federated.updates import FlatModel


@ATTACKERS.register("neurotoxin")
class Neurotoxin(ModelReplacement):
    """Neurotoxin ("Neurotoxin: Durable Backdoors in Federated Learning", Zhang et al., ICML
    2022, arXiv 2206.10341): benign clients keep changing the coordinates with the largest
    updates and would overwrite a backdoor there, so the attacker leaves them alone.

    The benign gradient is approximated, as in the paper, by the last change of the
    global model (observed in the main process after each round, shipped to clients as
    round state). Its top `ratio` coordinates by magnitude are masked: after every
    optimizer step of a compromised client they are reset to the global values, so its
    update is exactly zero there (resetting, not masking the gradient, also keeps
    momentum and weight decay off them). `ratio` default 0.05: the authors' published
    Neurotoxin command uses gradmask_ratio 0.95, i.e. keeps the bottom 95% and masks the
    top 5%. Before the first global change is observed (an attack in round 1) nothing is
    masked. The update is then scaled by `federated.weight_scale`.
    """

    def __init__(self, ratio: float = 0.05) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        self.ratio = ratio
        self.masked: Tensor | None = None  # sorted flat indices of the masked coordinates

    def observe(self, round_: int, old_global: Tensor, new_global: Tensor) -> None:
        change = (new_global - old_global).abs()
        k = max(1, math.ceil(self.ratio * change.numel()))
        self.masked = change.topk(k).indices.sort().values.cpu()

    def after_step(self, flat: FlatModel, start: Tensor) -> None:
        if self.masked is None:
            return
        masked = self.masked.to(start.device)
        params = flat.read()[0]
        params[masked] = start[masked]
        flat.write_params(params)

    def round_state(self) -> dict[str, Any]:
        return {} if self.masked is None else {"masked": self.masked}

    def load_round_state(self, state: dict[str, Any]) -> None:
        self.masked = state.get("masked")
