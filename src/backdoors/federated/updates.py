"""Model weights as flat vectors: what a client sends and what the server aggregates.

Trainable parameters form the update vector that goes through the aggregator. Floating
point buffers (batch-norm running mean and variance) are not updates an attacker should
be able to scale, and robust rules are not designed for them: the server sets them to the
sample-weighted mean of the accepted clients' local buffers. Integer buffers
(num_batches_tracked) keep the global value: with a momentum set, batch norm never reads
them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FlatModel:
    """Reads and writes a model's parameters and float buffers as two flat vectors.

    Writing copies into the existing tensors (never aliases the vector), so one model and
    one optimizer serve every client in turn.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.buffers = [b for _, b in model.named_buffers() if b.is_floating_point()]

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)

    def head(self) -> slice | None:
        """Where the classifier head (`head.*` parameters) sits in the flat vector."""
        start = 0
        first = last = None
        for name, p in zip(self.names, self.params, strict=True):
            if name.startswith("head."):
                first = start if first is None else first
                last = start + p.numel()
            start += p.numel()
        return None if first is None else slice(first, last)

    @torch.no_grad()
    def read(self) -> tuple[Tensor, Tensor]:
        """Copies of (parameters, float buffers) as flat vectors."""
        return _flat(self.params), self.read_buffers()

    @torch.no_grad()
    def read_buffers(self) -> Tensor:
        return _flat(self.buffers)

    @torch.no_grad()
    def write(self, params: Tensor, buffers: Tensor) -> None:
        _unflat(params, self.params)
        _unflat(buffers, self.buffers)

    @torch.no_grad()
    def write_params(self, params: Tensor) -> None:
        """Copy a flat parameter vector into the model (buffers untouched): an attacker's
        projection or mask during local training."""
        _unflat(params, self.params)

    @torch.no_grad()
    def update_into(self, start: Tensor, out: Tensor) -> None:
        """out = current parameters - start (the client's update), without a temporary."""
        offset = 0
        for p in self.params:
            n = p.numel()
            torch.sub(p.reshape(-1), start[offset:offset + n], out=out[offset:offset + n])
            offset += n


def _flat(tensors: list[Tensor]) -> Tensor:
    if not tensors:
        return torch.empty(0)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflat(vec: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(vec[offset:offset + n].view_as(t))
        offset += n


def mean_buffers(buffers: Tensor, samples: Tensor, accepted: Tensor | None,
                 fallback: Tensor) -> Tensor:
    """Sample-weighted mean of the accepted clients' buffers [K, B]; `fallback` (the global
    buffers) when no accepted client trained on any sample."""
    w = samples.to(buffers.device, buffers.dtype)
    if accepted is not None:
        w = w * accepted.to(buffers.device, buffers.dtype)
    if buffers.shape[1] == 0 or float(w.sum()) == 0:
        return fallback
    return (w[:, None] * buffers).sum(0) / w.sum()
