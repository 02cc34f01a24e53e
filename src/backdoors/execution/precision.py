"""Mixed precision: the one autocast helper and fp16 loss scaling.

`autocast(device, precision)` is the only place the project enters torch.autocast; the
forward wrapper (execution/forward.py) calls it around every model forward pass, so the
losses and every gradient combination after the forward run in fp32. fp16 keeps small
gradients from underflowing with a torch.amp.GradScaler: the loss is multiplied by the
scale before backward and the optimizer step divides it out (and skips steps whose
gradients overflowed). bf16 has fp32's exponent range and needs no scaler.

Attacks fill gradients themselves (Attack.backward), so the scaler reaches them through a
context variable: a training loop enters `LossScaler.scope()` around the attack's step
and the attack differentiates `scaled(loss)`; code that needs true gradients (MGDA's
min-norm solve) divides by `loss_scale()`. Outside a scope both are the identity, so an
attack used by any other loop behaves exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import torch
from torch import Tensor

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}

_ACTIVE: ContextVar[torch.amp.GradScaler | None] = ContextVar("loss_scaler", default=None)


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """torch.autocast on `device`'s type in `precision` (disabled for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def scaled(loss: Tensor) -> Tensor:
    """The loss to differentiate: times the fp16 loss scale inside a scaled step, else
    the loss itself."""
    scaler = _ACTIVE.get()
    return loss if scaler is None else scaler.scale(loss)


def loss_scale(device: torch.device) -> Tensor | None:
    """The current loss scale as a device tensor (no host sync), or None when gradients
    are not scaled."""
    scaler = _ACTIVE.get()
    return None if scaler is None else scaler.scale(torch.ones((), device=device))


@contextmanager
def no_loss_scaling() -> Iterator[None]:
    """Gradients taken here are true gradients, for optimizers the scaler does not step
    (e.g. an evasion term's own trigger optimizer inside a training step)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class LossScaler:
    """The optimizer step of one training loop in `precision`: a GradScaler for fp16,
    a plain `optimizer.step()` otherwise. Its state is checkpointed with the loop's."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.enabled = precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled)

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Gradients filled here (by an attack's `backward`) are of `scaled(loss)`."""
        token = _ACTIVE.set(self.scaler if self.enabled else None)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def backward(self, loss: Tensor) -> None:
        """Backward of a loss the calling loop computed itself."""
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale, skip if any gradient overflowed, step, and adapt the scale."""
        if not self.enabled:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scale and its growth tracker ({} when disabled)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)
