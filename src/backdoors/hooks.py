"""Observers of a training run: TensorBoard, console lines, legacy outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


class Hook:
    """Receives training events; every method is optional."""

    def on_start(self, run_dir: Path, start_epoch: int, global_step: int) -> None:
        """Training is about to start (or resume) at `start_epoch`."""

    def on_train_log(self, global_step: int, losses: dict[str, float],
                     scales: dict[str, float]) -> None:
        """Mean losses and scales of the last `log_interval` steps."""

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: nn.Module) -> None:
        """An epoch (or federated round) finished and was evaluated; `row` is its
        metrics.jsonl row."""

    def on_scalars(self, group: str, values: dict[str, float], step: int) -> None:
        """Extra figures of the unit just finished (e.g. group "Federated": update norms,
        detection), after `on_epoch_end`."""

    def on_end(self) -> None:
        """Training stopped (finished, interrupted or failed)."""


TEST_TAGS = {
    "clean_accuracy": "Test/clean_accuracy", "clean_loss": "Test/clean_loss",
    "asr": "Test/asr", "backdoor_accuracy": "Test/backdoor_accuracy",
    "robust_accuracy": "Test/robust_accuracy", "backdoor_loss": "Test/backdoor_loss",
}


class TensorBoardHook(Hook):
    """Scalars under the Backdoors 101 tags Train/Loss_<task> and Train/Scale_<task>, and
    Test/<metric> per epoch (Train/DP_epsilon too under DP-SGD)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def on_start(self, run_dir: Path, start_epoch: int, global_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=global_step or None)

    def on_train_log(self, global_step: int, losses: dict[str, float],
                     scales: dict[str, float]) -> None:
        for name, value in losses.items():
            self.writer.add_scalar(f"Train/Loss_{name}", value, global_step)
        for name, value in scales.items():
            self.writer.add_scalar(f"Train/Scale_{name}", value, global_step)

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: nn.Module) -> None:
        for key, tag in TEST_TAGS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], epoch)
        for name, figures in row.get("variants", {}).items():
            for key, value in figures.items():
                if value is not None:
                    self.writer.add_scalar(f"Test/{key}/{name}", value, epoch)
        # On the training-step axis, like the Train/Loss_* scalars it explains.
        self.writer.add_scalar("Train/lr", row["lr"], row.get("global_step", epoch))
        if row.get("dp_epsilon") is not None:
            self.writer.add_scalar("Train/DP_epsilon", row["dp_epsilon"], epoch)
        self.writer.flush()

    def on_scalars(self, group: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def on_end(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pct(value: float | None) -> str:
    return "  n/a" if value is None or value != value else f"{100 * value:5.1f}%"


def epoch_line(epoch: int, last: int, row: dict[str, Any]) -> str:
    """One readable line per epoch."""
    losses = " ".join(f"{k} {v:.3f}" for k, v in row["train_loss"].items())
    per = "".join(f"  ASR[{name}] {pct(v['asr'])}" for name, v in row.get("variants", {}).items())
    dp = "" if "dp_epsilon" not in row else (
        "  |  DP eps n/a (no noise)" if row["dp_epsilon"] is None else
        f"  |  DP eps {row['dp_epsilon']:.2f} (delta {row['dp_delta']:g})")
    return (f"epoch {epoch}/{last}  loss {losses}  |  clean {pct(row['clean_accuracy'])}  "
            f"ASR {pct(row['asr'])}{per}  RA {pct(row['robust_accuracy'])}  "
            f"backdoor-all {pct(row['backdoor_accuracy'])}{dp}  |  {row['train_seconds']:.1f}s")


class ConsoleHook(Hook):
    """Prints `epoch_line` to stdout."""

    def __init__(self, last_epoch: int) -> None:
        self.last_epoch = last_epoch

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: nn.Module) -> None:
        print(epoch_line(epoch, self.last_epoch, row), flush=True)
