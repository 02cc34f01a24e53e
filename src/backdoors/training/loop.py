"""Centralized training as an inner loop of the run lifecycle: one unit is one epoch over
the (poisoned) training set followed by an evaluation on the test set.

The lifecycle (lifecycle/session.py) owns the run: it calls `run_unit` for each epoch,
checkpoints `state_dict()` with the model's weights, and writes what `summary` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.attacks.base import Attack, StepReport
from backdoors.config import TrainConfig
from backdoors.data.dataset import Dataset
from backdoors.data.loader import Augment, Loader
from backdoors.execution import LossScaler, accelerated
from backdoors.hooks import ConsoleHook, Hook
from backdoors.seeds import EVAL, TRAIN, derive, stream
from backdoors.synthesizers.base import Synthesizer
from backdoors.training.accounting import epsilon, sample_rate
from backdoors.training.dp import DPSGD
from backdoors.training.optim import make_optimizer, make_scheduler, stepped_per_batch
from backdoors.training.trainer import EpochStats, Trainer

SUMMARY_KEYS = ("clean_accuracy", "asr", "backdoor_accuracy", "robust_accuracy", "clean_loss",
                "backdoor_loss", "variants", "dp_epsilon", "dp_delta")

StepCallback = Callable[[int, int, StepReport], None]


class EpochLoop:
    """Trains `model` with `attack` on `train_set` for epochs start_epoch..epochs."""

    unit = "epoch"
    scalar_group = "Train"

    def __init__(self, model: nn.Module, attack: Attack, synthesizer: Synthesizer,
                 train_set: Dataset, test_loader: Loader, backdoor_loader: Loader | None,
                 tc: TrainConfig, seed: int, augment: Augment | None, num_workers: int,
                 device: torch.device) -> None:
        self.model, self.attack, self.tc = model, attack, tc
        self.train_size = len(train_set)
        self.generator = stream(seed, TRAIN)
        self.loader = Loader(train_set, tc.batch_size, device, shuffle=True,
                             generator=self.generator, augment=augment,
                             max_batches=tc.max_batches, num_workers=num_workers)
        self.optimizer = make_optimizer(model, tc)
        self.scheduler = make_scheduler(self.optimizer, tc, len(self.loader))
        self.forward = accelerated(model, tc, device)
        self.scaler = LossScaler(tc.precision, device)
        self.trainer = Trainer(self.forward, attack, self.optimizer, self.scheduler,
                               self.loader, test_loader, synthesizer, self.generator,
                               eval_seed=derive(seed, EVAL), progress=tc.progress,
                               backdoor_loader=backdoor_loader, scaler=self.scaler,
                               scheduler_per_batch=stepped_per_batch(tc))
        self.first, self.last = tc.start_epoch, tc.epochs
        self.steps_per_unit = len(self.loader)

    def global_step(self, epoch: int) -> int:
        """Training steps taken before `epoch` (TensorBoard's step for training losses)."""
        return (epoch - 1) * self.steps_per_unit

    def console(self) -> Hook:
        return ConsoleHook(self.last)

    def start(self) -> None:
        """The model holds its start weights (before a resumed run's state is restored)."""
        self.attack.start(self.model)

    def run_unit(self, epoch: int, on_step: StepCallback) -> dict[str, Any]:
        """Train one epoch, evaluate; return its metrics.jsonl row."""
        lr = self.optimizer.param_groups[0]["lr"]
        stats = self.trainer.train_epoch(epoch, on_step)
        row = epoch_row(epoch, lr, stats, self.trainer.evaluate())
        row["global_step"] = epoch * self.steps_per_unit
        if isinstance(self.attack, DPSGD):
            tc = self.tc
            row["dp_epsilon"] = epsilon(tc.dp_sigma, sample_rate(tc.batch_size, self.train_size),
                                        self.attack.steps, tc.dp_delta)
            row["dp_delta"] = tc.dp_delta
        return row

    def scalars(self, row: dict[str, Any]) -> dict[str, float]:
        return {}

    def poison_rows(self) -> Tensor | None:
        """None: the training set was poisoned once, before the first epoch."""
        return None

    def close(self) -> None:
        """Nothing to release."""

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Final figures: the last epoch's, the best clean accuracy, the mean epoch time,
        and why compilation fell back to eager if it did. A run with no epoch to train
        (start_epoch > epochs) reports the model as given."""
        fallback = self.forward.compile_fallback
        extra = {} if fallback is None else {"compile_fallback": fallback}
        if not rows:
            metrics = self.trainer.evaluate()
            return {**{k: metrics[k] for k in SUMMARY_KEYS if k in metrics},
                    "epochs": self.first - 1, "best_clean_accuracy": metrics["clean_accuracy"],
                    "seconds_per_epoch": None, **extra}
        last = rows[-1]
        return {**{k: last[k] for k in SUMMARY_KEYS if k in last}, "epochs": last["epoch"],
                "best_clean_accuracy": max(r["clean_accuracy"] for r in rows),
                "seconds_per_epoch": sum(r["train_seconds"] for r in rows) / len(rows),
                **extra}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "train_generator": self.generator.get_state(),
                "attack": self.attack.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["train_generator"])
        self.attack.load_state_dict(state["attack"])
        self.scaler.load_state_dict(state.get("scaler", {}))


def epoch_row(epoch: int, lr: float, stats: EpochStats, metrics: dict[str, float]
              ) -> dict[str, Any]:
    return {"kind": "epoch", "epoch": epoch, "lr": lr, "train_seconds": stats.seconds,
            "train_samples": stats.samples, "train_loss": stats.losses,
            "train_scale": stats.scales, **metrics}
