"""Optimizers and learning-rate schedules from TrainConfig."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from backdoors.config import TrainConfig
from backdoors.errors import ConfigError


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (lr, momentum, Nesterov, weight decay) or Adam (lr, weight decay), as in
    Backdoors 101."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def stepped_per_batch(cfg: TrainConfig) -> bool:
    """Whether the training loop steps the scheduler after every batch (linear) rather
    than after every epoch."""
    return cfg.scheduler == "linear"


def warmup_linear(total: int, warmup: float) -> Callable[[int], float]:
    """The lr factor at step s of `total`: (s + 1) / w over the first w = round(warmup *
    total) steps, then a linear fall from 1 to 1 / (total - w) at the last step (0 after)."""
    rise = round(warmup * total)
    fall = max(1, total - rise)

    def factor(step: int) -> float:
        if step < rise:
            return (step + 1) / rise
        return max(0.0, (total - step) / fall)

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int = 1
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch, except linear (see stepped_per_batch). cosine anneals to 0
    over the epochs this config trains; multistep multiplies the lr by gamma after each
    milestone epoch; linear warms up then decays to 0 over the `steps_per_epoch` * epochs
    steps this config trains (a caller stepping it per epoch passes 1)."""
    span = max(1, cfg.epochs - cfg.start_epoch + 1)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=span)
    if cfg.scheduler == "linear":
        factor = warmup_linear(span * steps_per_epoch, cfg.warmup)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if cfg.scheduler == "multistep":
        milestones = [m - cfg.start_epoch + 1 for m in cfg.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.gamma)
    return None


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; a device this machine lacks is a
    ConfigError (checked before a run folder is made)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device: {name} asked for, but this machine has no CUDA "
                              f"device (torch {torch.__version__}); use device: auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device: {name} asked for, but this machine has "
                              f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: mps asked for, but MPS is not available here; use "
                          "device: auto or cpu")
    return device
