"""Norm constraints on a compromised client's update, shared by the attackers that bound
it (PGD, constrain-and-scale)."""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.federated.updates import FlatModel


@torch.no_grad()
def project_l2_(update: Tensor, radius: float) -> Tensor:
    """Scale `update` in place onto the L2 ball of `radius` around 0 when it lies outside;
    a second pass absorbs the rounding of the first, so the norm never exceeds radius."""
    for _ in range(2):
        norm = float(update.norm())
        if norm <= radius:
            break
        update.mul_(radius / norm)
    return update


@torch.no_grad()
def project_model(flat: FlatModel, start: Tensor, radius: float, scratch: Tensor) -> None:
    """Move the model's parameters onto the L2 ball of `radius` around `start`
    (`scratch`: a buffer of the parameter vector's size)."""
    flat.update_into(start, scratch)
    if float(scratch.norm()) > radius:
        flat.write_params(start + project_l2_(scratch, radius))
