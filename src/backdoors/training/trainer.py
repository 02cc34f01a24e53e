"""The training loop: one epoch of attack-supplied gradients, and evaluation.

The trainer knows nothing about attacks beyond `Attack.backward`, which fills the
gradients for a batch; DP and federated training wrap or call it. `model` is what the
attack runs: an execution.Accelerated wrapper (precision, channels_last, compile) or a
plain module; `scaler` steps the optimizer (fp16 loss scaling, execution/precision.py).

Host syncs per step: each step reads its losses as Python floats (StepReport), which
check_finite needs to stop at the exact diverging step, and MGDA's min-norm solve runs
on the host. Everything else (data, augmentation, triggers) stays on the device.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from backdoors.attacks.base import Attack, StepReport
from backdoors.data.loader import Loader
from backdoors.errors import Diverged
from backdoors.execution.precision import LossScaler
from backdoors.metrics import evaluate
from backdoors.synthesizers.base import Synthesizer

StepCallback = Callable[[int, int, StepReport], None]


@dataclass
class EpochStats:
    """Sample-weighted mean loss and mean scale of each term over one epoch."""

    losses: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0


def _progress(iterable: Loader, enabled: bool, desc: str):  # noqa: ANN202 - tqdm or plain
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def check_finite(report: StepReport, epoch: int, step: int) -> None:
    """Stop at the first non-finite loss: one nan poisons every later step, and a run that
    goes on would end "completed" at chance accuracy. (The losses are already Python
    floats, so checking costs no device synchronisation.)"""
    for name, value in report.losses.items():
        if not math.isfinite(value):
            raise Diverged(f"epoch {epoch}, step {step + 1}", f"loss '{name}' is {value}")


@dataclass
class Trainer:
    model: nn.Module
    attack: Attack
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_loader: Loader
    test_loader: Loader
    synthesizer: Synthesizer | None
    generator: torch.Generator
    eval_seed: int = 0
    progress: bool = True
    backdoor_loader: Loader | None = None
    scaler: LossScaler = field(
        default_factory=lambda: LossScaler("fp32", torch.device("cpu")))
    scheduler_per_batch: bool = False

    def train_epoch(self, epoch: int, on_step: StepCallback | None = None) -> EpochStats:
        """One pass over the training loader; the scheduler steps after every batch
        (`scheduler_per_batch`) or once at the end."""
        self.model.train()
        stats = EpochStats()
        totals: dict[str, float] = {}
        scale_sums: dict[str, float] = {}
        scale_counts: dict[str, int] = {}
        start = time.perf_counter()
        for step, batch in enumerate(_progress(self.train_loader, self.progress, f"epoch {epoch}")):
            self.optimizer.zero_grad(set_to_none=True)
            with self.scaler.scope():
                report = self.attack.backward(self.model, batch, self.generator)
            check_finite(report, epoch, step)
            self.scaler.step(self.optimizer)
            if self.scheduler is not None and self.scheduler_per_batch:
                self.scheduler.step()
            n = len(batch)
            stats.samples += n
            for name, value in report.losses.items():
                totals[name] = totals.get(name, 0.0) + value * n
            for name, value in report.scales.items():
                scale_sums[name] = scale_sums.get(name, 0.0) + value
                scale_counts[name] = scale_counts.get(name, 0) + 1
            if on_step is not None:
                on_step(epoch, step, report)
        if self.scheduler is not None and not self.scheduler_per_batch:
            self.scheduler.step()
        stats.seconds = time.perf_counter() - start
        stats.losses = {k: v / max(stats.samples, 1) for k, v in totals.items()}
        stats.scales = {k: v / scale_counts[k] for k, v in scale_sums.items()}
        return stats

    def evaluate(self) -> dict[str, float]:
        """Test metrics; triggers draw from a generator reset each call, so dynamic triggers
        are evaluated identically every epoch and evaluation never shifts training RNG."""
        gen = torch.Generator().manual_seed(self.eval_seed)
        return evaluate(self.model, self.test_loader, self.synthesizer, gen,
                        self.backdoor_loader)
