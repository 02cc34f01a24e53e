"""The forward pass every training and evaluation path calls.

`Accelerated` wraps a model: inputs are converted to channels_last (when asked), the
forward runs under the project's one autocast (execution/precision.py) and through the
compiled callable (when asked), and floating outputs come back in fp32 so the losses
and metrics after it are computed as in an fp32 run. The wrapped model stays the model:
its parameters are the wrapper's, and any other attribute (`features`, `head`, ...)
is read through, so attacks and DP-SGD take the wrapper wherever they took the model.
Checkpoints are made from the wrapped module itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from backdoors.config.train import TrainConfig
from backdoors.execution.compiled import CompiledForward
from backdoors.execution.precision import autocast


class Accelerated(nn.Module):
    """`module` run in `precision` (fp32, bf16, fp16), optionally channels_last (the
    module's weights are converted here, once) and compiled."""

    def __init__(self, module: nn.Module, device: torch.device, precision: str = "fp32",
                 channels_last: bool = False, use_compile: bool = False) -> None:
        super().__init__()
        self.module = module
        self.device, self.precision, self.channels_last = device, precision, channels_last
        if channels_last:
            module.to(memory_format=torch.channels_last)
        # Not a submodule: the compiled wrapper would repeat the weights in state_dict.
        self.compiled = CompiledForward(module) if use_compile else None

    @property
    def compile_fallback(self) -> str | None:
        """Why compilation was given up (None: compiled, or not asked for)."""
        return None if self.compiled is None else self.compiled.fallback

    def forward(self, x: Tensor) -> Any:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        call = self.compiled if self.compiled is not None else self.module
        with autocast(self.device, self.precision):
            out = call(x)
        if self.precision != "fp32" and isinstance(out, Tensor) and out.is_floating_point():
            return out.float()
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__["_modules"].get("module")
            if module is None:
                raise
            return getattr(module, name)


def accelerated(model: nn.Module, train: TrainConfig, device: torch.device,
                whole: bool = True) -> Accelerated:
    """The forward pass a run calls, as its `train:` section asks. `whole=False` keeps
    only the precision: for models made on the side (a defense's copies), which are not
    worth compiling or converting one by one."""
    if not whole:
        return Accelerated(model, device, train.precision)
    return Accelerated(model, device, train.precision, train.channels_last, train.compile)
