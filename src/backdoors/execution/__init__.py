"""How the model's arithmetic runs: precision (autocast, fp16 loss scaling), memory
format (channels_last) and compilation (torch.compile with an eager fallback).

`Accelerated` is the forward pass every training and evaluation path calls; `LossScaler`
is the optimizer step of every training loop. Neither changes what is computed, only how.
"""

from backdoors.execution.forward import Accelerated, accelerated
from backdoors.execution.precision import (
    PRECISIONS,
    LossScaler,
    autocast,
    no_loss_scaling,
    scaled,
)

__all__ = ["PRECISIONS", "Accelerated", "LossScaler", "accelerated", "autocast",
           "no_loss_scaling", "scaled"]
