"""Chameleon: contrastive training of the encoder, then the head on the poisoned data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.errors import ConfigError
from backdoors.federated.attackers.base import ATTACKERS, AttackerSetup, ModelReplacement
from backdoors.federated.attackers.chameleon_loss import chameleon_loss
from backdoors.federated.clients import ClientReport, LocalPlan, LocalTraining
from backdoors.synthesizers.base import Synthesizer


@ATTACKERS.register("chameleon")
class Chameleon(ModelReplacement):
    """Chameleon ("Chameleon: Adapting to Peer Images for Planting Durable Backdoors in
    Federated Learning", Dai & Li, ICML 2023, arXiv 2304.12961).

    A compromised client trains in two stages. (a) The encoder (everything but
    `model.head`) learns with `chameleon_loss`, a supervised contrastive loss on
    penultimate features where poisoned images are pulled toward interferers (benign
    target-class images) and pushed from facilitators (benign images of their own
    class), for `contrastive_epochs` (default 10, the paper's retraining epochs) with
    SGD (lr `contrastive_lr`, default the attacker's lr; momentum 0.9, weight decay
    5e-4 as in the paper), `temperature` default 0.07 (supervised contrastive learning's)
    and `facilitator_weight` default 2. Each batch of the client's local data gets
    triggered copies of the first `fraction` (default 0.5) of its rows whose label the
    trigger changes; those copies know their original class, whatever injection method
    the config uses. (b) With the encoder frozen, the head trains with the config's
    injection method on the poisoned local data for `head_epochs` (default the
    attacker's local epochs). The update is local - global, scaled by weight_scale.

    Chosen over A3FL because it works with any trigger and injection method (A3FL
    optimises the trigger itself, so it only applies to optimisable triggers).
    """

    def __init__(self, contrastive_epochs: int = 10, head_epochs: int | None = None,
                 temperature: float = 0.07, facilitator_weight: float = 2.0,
                 fraction: float = 0.5, contrastive_lr: float | None = None) -> None:
        if contrastive_epochs < 0:
            raise ValueError(f"contrastive_epochs must be >= 0, got {contrastive_epochs}")
        if head_epochs is not None and head_epochs < 1:
            raise ValueError(f"head_epochs must be >= 1, got {head_epochs}")
        if temperature <= 0 or facilitator_weight <= 0:
            raise ValueError("temperature and facilitator_weight must be > 0")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if contrastive_lr is not None and contrastive_lr <= 0:
            raise ValueError(f"contrastive_lr must be > 0, got {contrastive_lr}")
        self.contrastive_epochs, self.head_epochs = contrastive_epochs, head_epochs
        self.temperature, self.facilitator_weight = temperature, facilitator_weight
        self.fraction, self.contrastive_lr = fraction, contrastive_lr

    def bind(self, setup: AttackerSetup) -> None:
        super().bind(setup)
        if setup.head is None:
            raise ConfigError("federated.attacker (chameleon) needs a model with features() "
                              "and a `head` layer")

    def train(self, local: LocalTraining, data: ArrayDataset, start: tuple[Tensor, Tensor],
              plan: LocalPlan, generator: torch.Generator, update_out: Tensor
              ) -> ClientReport:
        model = local.flat.model
        local.flat.write(*start)
        losses = self.contrastive_stage(model, local, data, plan.attack.synthesizer,
                                        plan.lr, generator)
        with frozen_encoder(model):
            head_plan = LocalPlan(plan.attack, self.head_epochs or plan.epochs, plan.lr)
            report = local.train(data, local.flat.read(), head_plan, generator, update_out)
        local.flat.update_into(start[0], update_out)  # both stages: local - global
        if losses:
            report.losses["contrastive"] = losses[-1]
        return report

    def contrastive_stage(self, model: nn.Module, local: LocalTraining, data: ArrayDataset,
                          synthesizer: Synthesizer, lr: float, generator: torch.Generator
                          ) -> list[float]:
        """Stage (a): the encoder's epochs; returns each epoch's mean loss."""
        if self.contrastive_epochs == 0 or len(data) == 0:
            return []
        encoder = [p for p in encoder_params(model) if p.requires_grad]
        optimizer = torch.optim.SGD(encoder, lr=self.contrastive_lr or lr, momentum=0.9,
                                    weight_decay=5e-4)
        loader = Loader(data, local.batch_size, local.device, shuffle=True,
                        generator=generator, augment=local.augment,
                        max_batches=local.max_batches)
        model.train()
        means = []
        for _ in range(self.contrastive_epochs):
            total, rows = 0.0, 0
            for batch in loader:
                x, labels, origin, poisoned = self.contrast_batch(batch, synthesizer,
                                                                  generator)
                optimizer.zero_grad(set_to_none=True)
                loss = chameleon_loss(model.features(x), labels, origin,  # type: ignore[operator]
                                      poisoned, self.temperature, self.facilitator_weight)
                loss.backward()
                optimizer.step()
                total, rows = total + float(loss.detach()) * len(x), rows + len(x)
            means.append(total / max(rows, 1))
        return means

    def contrast_batch(self, batch: Batch, synthesizer: Synthesizer,
                       generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch plus triggered copies of its first `fraction` of eligible rows:
        (inputs, labels, original labels, poisoned flags)."""
        eligible = synthesizer.eligible(batch).nonzero().flatten()
        chosen = eligible[: max(1, round(self.fraction * len(eligible)))]
        if len(chosen) == 0:
            none = torch.zeros(len(batch), dtype=torch.bool, device=batch.device)
            return batch.inputs, batch.labels, batch.labels, none
        copies = synthesizer.apply(batch.select(chosen), 1.0, generator)
        poisoned = torch.cat([torch.zeros(len(batch), dtype=torch.bool, device=batch.device),
                              torch.ones(len(chosen), dtype=torch.bool, device=batch.device)])
        return (torch.cat([batch.inputs, copies.inputs]),
                torch.cat([batch.labels, copies.labels]),
                torch.cat([batch.labels, batch.labels[chosen]]), poisoned)


def encoder_params(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside `model.head`."""
    head = {id(p) for p in model.head.parameters()}  # type: ignore[union-attr]
    return [p for p in model.parameters() if id(p) not in head]


@contextmanager
def frozen_encoder(model: nn.Module) -> Iterator[None]:
    """Stage (b): only the head gets gradients (optimizers skip parameters without)."""
    encoder = [p for p in encoder_params(model) if p.requires_grad]
    for p in encoder:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in encoder:
            p.requires_grad_(True)
