"""Training-loss rows: step reports averaged over `log_interval` steps, logged to the run's
metrics.jsonl and passed to the hooks (TensorBoard's Train/Loss_* and Train/Scale_*)."""

from __future__ import annotations

from typing import Any

from backdoors.hooks import Hook
from backdoors.runs import RunFolder


class TrainLog:
    """Averages step reports over `interval` steps, then logs a row and tells the hooks."""

    def __init__(self, folder: RunFolder, hooks: list[Hook], interval: int,
                 steps_per_epoch: int) -> None:
        self.folder, self.hooks, self.interval = folder, hooks, interval
        self.steps_per_epoch = steps_per_epoch
        self.losses: dict[str, list[float]] = {}
        self.scales: dict[str, list[float]] = {}

    def on_step(self, epoch: int, step: int, report: Any) -> None:
        steps_per_epoch = self.steps_per_epoch
        for k, v in report.losses.items():
            self.losses.setdefault(k, []).append(v)
        for k, v in report.scales.items():
            self.scales.setdefault(k, []).append(v)
        if (step + 1) % self.interval and step + 1 != steps_per_epoch:
            return
        losses = {k: sum(v) / len(v) for k, v in self.losses.items()}
        scales = {k: sum(v) / len(v) for k, v in self.scales.items()}
        global_step = (epoch - 1) * steps_per_epoch + step + 1
        self.folder.log({"kind": "train", "epoch": epoch, "step": step + 1,
                         "global_step": global_step, "loss": losses, "scale": scales})
        for hook in self.hooks:
            hook.on_train_log(global_step, losses, scales)
        self.losses, self.scales = {}, {}
