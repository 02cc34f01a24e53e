"""Optimizers and learning-rate schedules from TrainConfig."""

from __future__ import annotations

import torch
from torch import nn

from backdoors.config import TrainConfig
from backdoors.errors import ConfigError


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (lr, momentum, weight decay) or Adam (lr, weight decay), as in Backdoors 101."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch. cosine anneals to 0 over the epochs this config trains;
    multistep multiplies the lr by gamma after each milestone epoch."""
    if cfg.scheduler == "cosine":
        span = max(1, cfg.epochs - cfg.start_epoch + 1)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=span)
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
