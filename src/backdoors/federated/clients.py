"""Local training of one participant, on one model and optimizer shared by all of them.

A client starts from the global weights, trains `local_epochs` with the project's Trainer
and sends (local - global). Honest clients use the `none` attack (plain cross-entropy);
compromised clients use the config's synthesizer and attack on their own local data, so
every injection method works: `data` poisons their local set once, `batch` and `blind`
poison each batch. Reusing one model and one optimizer (its momentum cleared per client)
keeps a round with 100 clients about training, not setup. Every client runs the shared
forward wrapper (`forward`: precision, compile) and a fresh fp16 loss scaler, so a
client's training depends only on its own steps, whichever engine or worker runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from backdoors.attacks import Attack
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Augment, Loader
from backdoors.execution import Accelerated, LossScaler
from backdoors.federated.updates import FlatModel
from backdoors.training.trainer import Trainer


@dataclass
class LocalPlan:
    """How one kind of client (honest or compromised) trains."""

    attack: Attack
    epochs: int
    lr: float


@dataclass
class ClientReport:
    samples: int
    losses: dict[str, float]
    seconds: float


class LocalTraining:
    """Trains clients one after another on the shared model and optimizer."""

    def __init__(self, flat: FlatModel, optimizer: torch.optim.Optimizer, test_loader: Loader,
                 batch_size: int, device: torch.device, augment: Augment | None,
                 max_batches: int | None = None, forward: Accelerated | None = None) -> None:
        self.flat, self.optimizer, self.test_loader = flat, optimizer, test_loader
        self.forward = forward if forward is not None else Accelerated(flat.model, device)
        self.batch_size, self.device, self.max_batches = batch_size, device, max_batches
        self.augment = augment

    def train(self, dataset: ArrayDataset, start: tuple[Tensor, Tensor], plan: LocalPlan,
              generator: torch.Generator, update_out: Tensor,
              after_step: Callable[[], None] | None = None) -> ClientReport:
        """Train from `start` (global parameters, buffers); write the update to
        `update_out`. `after_step` runs after every optimizer step (an attacker's
        projection). The model is left holding the client's local weights."""
        self.flat.write(*start)
        plan.attack.start(self.flat.model)  # e.g. evasion terms copy the pre-attack model
        self.optimizer.state.clear()  # momentum from the previous client must not leak
        for group in self.optimizer.param_groups:
            group["lr"] = plan.lr
        report = ClientReport(len(dataset), {}, 0.0)
        if len(dataset) == 0:
            update_out.zero_()
            return report
        loader = Loader(dataset, self.batch_size, self.device, shuffle=True,
                        generator=generator, augment=self.augment, max_batches=self.max_batches)
        trainer = Trainer(self.forward, plan.attack, self.optimizer, None, loader,
                          self.test_loader, None, generator, progress=False,
                          scaler=LossScaler(self.forward.precision, self.device))
        totals: dict[str, float] = {}
        on_step = None if after_step is None else (lambda *_: after_step())
        for epoch in range(1, plan.epochs + 1):
            stats = trainer.train_epoch(epoch, on_step)
            report.seconds += stats.seconds
            for name, value in stats.losses.items():
                totals[name] = totals.get(name, 0.0) + value / plan.epochs
        report.losses = totals
        self.flat.update_into(start[0], update_out)
        return report
