"""torch.compile with a fallback: a model that cannot be compiled runs eagerly.

Compilation happens lazily, at the first call (and again when a guard fails, e.g. the
switch from training to evaluation mode), so a missing compiler toolchain or an
unsupported model shows up there. The first failure prints one line saying why and the
module runs eagerly from then on; a genuine error of the model is raised again by the
eager call, so nothing is hidden.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

# The torch.compile backend. Tests swap in "eager" (tracing without code generation),
# which takes seconds where inductor takes a minute on a small CPU.
BACKEND = "inductor"


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, without the traceback. A first line that only
    introduces the next ("backend='inductor' raised:") is joined with it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(exc).__name__}: {first}"


class CompiledForward:
    """Calls `torch.compile(module)`; on failure, `module` itself, for good.

    Only this callable is compiled: the module keeps its attributes, hooks and
    state_dict keys (no `_orig_mod.` prefix), so checkpoints, defenses and federated
    code that read `features` or `head` see the plain module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.fallback: str | None = None
        try:
            import torch

            self.compiled: Any = torch.compile(module, backend=BACKEND)
        except Exception as exc:  # noqa: BLE001 - any failure means "run eagerly"
            self._give_up(exc)

    def _give_up(self, exc: BaseException) -> None:
        self.compiled = None
        self.fallback = one_line(exc)
        print(f"train.compile: running eagerly, compilation failed ({self.fallback})",
              file=sys.stderr)

    def __call__(self, x: Tensor) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as exc:  # noqa: BLE001 - the eager call re-raises real errors
                self._give_up(exc)
        return self.module(x)
