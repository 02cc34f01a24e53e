"""The `train:` section: optimisation and bookkeeping of a run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from backdoors.errors import ConfigError

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. Epochs are counted from 1.

    nesterov: Nesterov momentum (SGD). scheduler: none, cosine (annealing over all epochs),
    multistep (lr * gamma at each of `milestones`) or linear (per step: a linear rise over
    the first `warmup` fraction of the steps, then a linear decay to 0 at the last).
    device: auto (CUDA when available, else CPU), cpu, cuda, cuda:N.
    pretrained: a weights file (safetensors or a checkpoint) to start from; resume_model:
    a checkpoint whose weights are loaded and whose epoch + 1 is the first epoch trained.
    dp: DP-SGD (docs/privacy.md): clip each sample's gradient to L2 norm `dp_clip`, add
    Gaussian noise with std `dp_sigma` * `dp_clip`; epsilon is reported for `dp_delta`.
    precision: fp32, bf16 or fp16 (autocast; fp16 adds a loss scaler). channels_last: the
    model and its inputs in channels_last memory format. compile: torch.compile the
    model's forward, falling back to eager where that fails (docs/precision.md).
    """

    epochs: int = 10
    start_epoch: int = 1
    batch_size: int = 64
    test_batch_size: int = 256
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    scheduler: Literal["none", "cosine", "multistep", "linear"] = "none"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup: float = 0.2
    device: str = "auto"
    max_batches: int | None = None
    log_interval: int = 100
    save_on_epochs: list[int] = field(default_factory=list)
    tensorboard: bool = True
    progress: bool = True
    pretrained: str | None = None
    resume_model: str | None = None
    dp: bool = False
    dp_clip: float = 1.0
    dp_sigma: float = 1.0
    dp_delta: float = 1e-5
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        for key in ("epochs", "start_epoch", "batch_size", "test_batch_size", "log_interval"):
            _at_least(key, getattr(self, key), 1)
        if self.max_batches is not None:
            _at_least("max_batches", self.max_batches, 1)
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("train.nesterov needs optimizer: sgd and momentum > 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"train.warmup is a fraction of the steps, in [0, 1), got "
                              f"{self.warmup}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.gamma <= 0:
            raise ConfigError(f"train.gamma must be > 0, got {self.gamma}")
        for key in ("milestones", "save_on_epochs"):
            bad = [e for e in getattr(self, key) if e < 1]
            if bad:
                raise ConfigError(f"train.{key} are epochs (>= 1), got {bad[0]}")
        if self.scheduler == "multistep" and not self.milestones:
            raise ConfigError("train.scheduler: multistep needs train.milestones, e.g. "
                              "milestones: [50, 75]")
        if self.dp_clip <= 0:
            raise ConfigError(f"train.dp_clip must be > 0, got {self.dp_clip}")
        if self.dp_sigma < 0:
            raise ConfigError(f"train.dp_sigma must be >= 0, got {self.dp_sigma}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"train.dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.dp and self.precision == "fp16":
            raise ConfigError("train.dp cannot run with train.precision: fp16 (DP-SGD writes "
                              "per-sample gradients itself, with no loss scale to keep fp16 "
                              "gradients from underflowing); use precision: bf16 or fp32")
        if self.dp and self.channels_last:
            raise ConfigError("train.dp cannot run with train.channels_last: true (per-sample "
                              "gradients run the model under torch.func.vmap, which cannot "
                              "convert inputs to channels_last); set channels_last: false")
        if not DEVICE.match(self.device):
            raise ConfigError(f"train.device must be auto, cpu, mps, cuda or cuda:N, got "
                              f"'{self.device}'")
        for key in ("pretrained", "resume_model"):
            if getattr(self, key) == "":
                raise ConfigError(f"train.{key} must be a file path (or null), got ''")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"train.{key} must be >= {low}, got {value}")
