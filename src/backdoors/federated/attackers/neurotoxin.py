"""Neurotoxin: keep the backdoor out of the coordinates benign training changes most."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.federated.attackers.base import ATTACKERS, ModelReplacement
from backdoors.federated.updates import FlatModel

if TYPE_CHECKING:
    from backdoors.federated.clients import ClientReport, LocalPlan, LocalTraining


@ATTACKERS.register("neurotoxin")
class Neurotoxin(ModelReplacement):
    """Neurotoxin ("Neurotoxin: Durable Backdoors in Federated Learning", Zhang et al., ICML
    2022, arXiv 2206.10341): benign clients keep changing the coordinates with the largest
    updates and would overwrite a backdoor there, so the attacker leaves them alone.

    `mask_from` says where the benign direction comes from. `gradient` (default, as the
    authors' image-classification code does): the gradient of the cross-entropy on the
    attacker's own local data at the global weights, computed when its local training
    starts. `global_change`: the last change of the global model (observed in the main
    process after each round, shipped to clients as round state), the paper's
    description; when a boosted attacker took part in that round, that change is mostly
    its own backdoor, which the next attack round would then be barred from
    reinforcing. Its top `ratio` coordinates by magnitude are masked: after every
    optimizer step of a compromised client they are reset to the global values, so its
    update is exactly zero there (resetting, not masking the gradient, also keeps
    momentum and weight decay off them). `ratio` default 0.05: the authors' published
    Neurotoxin command uses gradmask_ratio 0.95, i.e. keeps the bottom 95% and masks the
    top 5%. With `global_change`, nothing is masked before the first global change is
    observed (an attack in round 1). The update is then scaled by
    `federated.weight_scale`.
    """

    def __init__(self, ratio: float = 0.05,
                 mask_from: Literal["gradient", "global_change"] = "gradient") -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        self.ratio, self.mask_from = ratio, mask_from
        self.masked: Tensor | None = None  # sorted flat indices of the masked coordinates

    def _top(self, magnitude: Tensor) -> Tensor:
        k = max(1, math.ceil(self.ratio * magnitude.numel()))
        return magnitude.topk(k).indices.sort().values

    def observe(self, round_: int, old_global: Tensor, new_global: Tensor) -> None:
        if self.mask_from == "global_change":
            self.masked = self._top((new_global - old_global).abs()).cpu()

    def train(self, local: LocalTraining, data: ArrayDataset, start: tuple[Tensor, Tensor],
              plan: LocalPlan, generator: torch.Generator, update_out: Tensor
              ) -> ClientReport:
        if self.mask_from == "gradient" and len(data) > 0:
            self.masked = self._top(benign_gradient(local, data, start).abs())
        return super().train(local, data, start, plan, generator, update_out)

    def after_step(self, flat: FlatModel, start: Tensor) -> None:
        if self.masked is None:
            return
        masked = self.masked.to(start.device)
        params = flat.read()[0]
        params[masked] = start[masked]
        flat.write_params(params)

    def round_state(self) -> dict[str, Any]:
        if self.mask_from == "gradient":  # made on the client, from its own data
            return {}
        return {} if self.masked is None else {"masked": self.masked}

    def load_round_state(self, state: dict[str, Any]) -> None:
        self.masked = state.get("masked")


def benign_gradient(local: LocalTraining, data: ArrayDataset, start: tuple[Tensor, Tensor]
                    ) -> Tensor:
    """The flat gradient of the mean cross-entropy over `data` (its own labels) at the
    weights `start`, in eval mode so batch-norm statistics do not move."""
    local.flat.write(*start)
    model = local.flat.model
    model.eval()
    model.zero_grad(set_to_none=True)
    loader = Loader(data, local.batch_size, local.device, shuffle=False)
    for batch in loader:
        loss = F.cross_entropy(model(batch.inputs), batch.labels, reduction="sum")
        (loss / len(data)).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in local.flat.params]
    out = torch.cat([g.reshape(-1) for g in grads])
    model.zero_grad(set_to_none=True)
    return out
