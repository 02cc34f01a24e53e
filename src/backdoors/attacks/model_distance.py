"""Model distance: a loss term that keeps the trained weights near where training started."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from backdoors.attacks.loss_terms import LOSS_TERMS, LossContext, LossTerm
from backdoors.synthesizers.base import Synthesizer


@LOSS_TERMS.register("model_distance")
class ModelDistance(LossTerm):
    """L2 distance of the trainable weights to their values when training started.

    The anomaly term L_ano of constrain-and-scale ("How To Backdoor Federated Learning",
    Bagdasaryan et al., AISTATS 2020, arXiv 1807.00459, Section 4): a federated client
    starts from the global model, so this is the norm of its update, the quantity
    norm-based anomaly detectors look at. Listed in the blind attack's loss_terms it
    keeps a centrally trained backdoor close to the pre-attack (e.g. pretrained) model.
    """

    def setup(self, model: nn.Module, synthesizer: Synthesizer) -> None:
        self.reference = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def __call__(self, ctx: LossContext) -> Tensor:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        diff = torch.cat([(p - r).reshape(-1) for p, r in zip(params, self.reference,
                                                               strict=True)])
        return torch.linalg.vector_norm(diff)  # its gradient at 0 is 0, not NaN

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = list(state["reference"])
