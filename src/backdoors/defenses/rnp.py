"""Reconstructive Neuron Pruning: unlearn the model on clean data, learn a filter mask that
recovers it, and prune the filters the recovery does not want back."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.loader import Loader
from backdoors.defenses.anp import NeuronPerturbation, neuron_shape
from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.channels import channel_layers, pruning_figures
from backdoors.defenses.layers import output_shapes
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import accuracy, unscaled_precision
from backdoors.execution import Accelerated, LossScaler


@torch.no_grad()
def prune_filters(model: nn.Module, names: list[str], pruned: list[Tensor]) -> nn.Module:
    """Zero the weight of the `pruned` channels of each named layer of `model`, in place:
    a BN channel keeps only its shift (the paper's code zeroes the BN weight), a conv
    channel only its bias."""
    for name, flags in zip(names, pruned, strict=True):
        weight = model.get_submodule(name).weight
        weight[flags.to(weight.device)] = 0.0
    return model


@DEFENSES.register("rnp")
class RNP(ModelRepair):
    """Reconstructive Neuron Pruning (arXiv 2305.14876).

    Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive Neuron Pruning for Backdoor
    Defense", ICML 2023.

    1. Unlearning (neuron level): a copy of the model is trained by gradient ascent on the
       cross-entropy of the clean budget (SGD `unlearning_lr`, momentum 0.9, weight decay
       5e-4, gradients clipped to norm `max_grad_norm`, the learning rate divided by 10
       from epoch `lr_drop_epoch`) until the accuracy of a batch, measured in the forward
       pass before its ascent step, is at most `clean_threshold`; at most
       `unlearning_epochs` epochs. The clean
       features are destroyed; the backdoor, which clean data does not exercise, survives.
    2. Recovering (filter level): the unlearned model's weights are frozen and every
       filter gets a mask m in [0, 1] (start 1) that scales it; the masks are trained by
       SGD (`recovering_lr`, momentum 0.9) on `alpha` x cross-entropy of the clean budget
       for `recovering_epochs` epochs, clipped to [0, 1] after each step. Recovering the
       clean function needs the clean filters back; the backdoor filters, whose
       amplified shortcut hurts clean predictions, are pushed towards 0.
    3. Pruning: in the original model (never the unlearned one), the filters whose mask
       is at most `threshold` are pruned (their weight zeroed), or with `pruning_by`
       number the `pruning_number` filters of smallest mask (the code's two modes, which
       it sweeps; here one point of the sweep is chosen). No fine-tuning follows.

    Figures: `scores.png` (histogram of 1 - mask), `masks.png` (every filter's mask) and
    `unlearning_curve.png` (clean-budget accuracy of each unlearning batch).

    Filters: the channels of every BatchNorm2d, the paper's (the mask scales the BN's
    weight, so a pruned channel outputs its shift); a model without batch norm (simple_net)
    gets the output channels of its conv layers (the mask scales the filter, the bias
    stays). Both phases run in training mode, as the paper's code.

    Defaults are the paper's code's: `unlearning_lr` 0.01, `unlearning_epochs` 20,
    `clean_threshold` 0.2, learning-rate drop at epoch 10, `recovering_lr` 0.2,
    `recovering_epochs` 20, `alpha` 0.2, `batch_size` 128, and `threshold` 0.2 (the
    pruning threshold of its published BadNets run). Deviations: the stopping rule is
    checked every batch, not every epoch (the code's running accuracy of an epoch): with a
    400-image budget simple_net falls from 99% to 8% within one epoch, and an unlearned
    model far past the threshold lets the recovery switch off most filters. The code calls its
    gradient clipping before the backward pass, where it clips nothing; here the gradient
    is clipped, as intended. The paper's clean budget is 500 images (1% of CIFAR-10); here
    `clean_fraction` (default 5%).

    Precision: both phases' forward passes run in the run's precision; the recovery steps
    with the loss scaler under fp16. The unlearning clips gradient norms, which needs
    unscaled gradients, so under fp16 it runs in fp32 (`unscaled_precision`).
    """

    def __init__(
        self,
        unlearning_lr: float = 0.01,
        unlearning_epochs: int = 20,
        clean_threshold: float = 0.2,
        lr_drop_epoch: int = 10,
        max_grad_norm: float = 20.0,
        recovering_lr: float = 0.2,
        recovering_epochs: int = 20,
        alpha: float = 0.2,
        threshold: float = 0.2,
        pruning_by: str = "threshold",
        pruning_number: int = 10,
        batch_size: int = 128,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if unlearning_lr <= 0 or recovering_lr <= 0 or alpha <= 0 or max_grad_norm <= 0:
            raise ValueError("unlearning_lr, recovering_lr, alpha and max_grad_norm must be > 0")
        if unlearning_epochs < 0 or recovering_epochs < 0 or lr_drop_epoch < 0:
            raise ValueError("unlearning_epochs, recovering_epochs and lr_drop_epoch must be "
                             ">= 0")
        if not 0.0 <= clean_threshold <= 1.0 or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"clean_threshold and threshold must be in [0, 1], got "
                             f"{clean_threshold} and {threshold}")
        if pruning_by not in ("threshold", "number"):
            raise ValueError(f"pruning_by must be 'threshold' or 'number', got {pruning_by!r}")
        if pruning_number < 0:
            raise ValueError(f"pruning_number must be >= 0, got {pruning_number}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.unlearning_lr, self.unlearning_epochs = unlearning_lr, unlearning_epochs
        self.clean_threshold, self.lr_drop_epoch = clean_threshold, lr_drop_epoch
        self.max_grad_norm = max_grad_norm
        self.recovering_lr, self.recovering_epochs = recovering_lr, recovering_epochs
        self.alpha, self.threshold, self.batch_size = alpha, threshold, batch_size
        self.pruning_by, self.pruning_number = pruning_by, pruning_number

    def _loader(self, data: DefenseData) -> Loader:
        return Loader(data.clean, self.batch_size, data.device, shuffle=True,
                      generator=data.generator)

    def unlearn(self, model: nn.Module, data: DefenseData) -> tuple[nn.Module, list[float]]:
        """A copy of `model` after gradient ascent on the clean budget, stopped at the
        first batch whose accuracy is at most `clean_threshold`, and the accuracy of every
        batch seen (the stopping rule's measure)."""
        model = copy.deepcopy(model).train().requires_grad_(True)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=self.unlearning_lr, momentum=0.9, weight_decay=5e-4)
        forward = Accelerated(model, data.device, unscaled_precision(data.precision))
        history: list[float] = []
        for epoch in data.progress.phase(range(self.unlearning_epochs),
                                         "unlearning the clean budget"):
            if epoch == self.lr_drop_epoch:
                for group in opt.param_groups:
                    group["lr"] = self.unlearning_lr / 10
            for batch in self._loader(data):
                logits = forward(batch.inputs)
                history.append(float((logits.argmax(1) == batch.labels).double().mean()))
                # Checked before each step, not once an epoch as the paper's code does: with
                # a few batches an epoch the model collapses within one epoch, and every
                # step past the threshold leaves the recovery more to rebuild.
                if history[-1] <= self.clean_threshold:
                    return model.requires_grad_(False), history
                opt.zero_grad(set_to_none=True)
                (-F.cross_entropy(logits, batch.labels)).backward()
                nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                opt.step()
        return model.requires_grad_(False), history

    def recover(self, unlearned: nn.Module, data: DefenseData) -> NeuronPerturbation:
        """Masks (one per filter of `channels.channel_layers`) trained to recover
        `unlearned` on the clean budget; the model's weights stay frozen."""
        layers = channel_layers(unlearned)
        shapes = output_shapes(unlearned, [m for _, m in layers], data.input_shape)
        masks = NeuronPerturbation(layers, [neuron_shape(s, "channel") for s in shapes])
        opt = torch.optim.SGD(masks.masks, lr=self.recovering_lr, momentum=0.9)
        forward = Accelerated(unlearned, data.device, data.precision)
        scaler = LossScaler(data.precision, data.device)
        unlearned.train()
        with masks.applied():
            for _ in data.progress.phase(range(self.recovering_epochs),
                                         "recovering with filter masks"):
                for batch in self._loader(data):
                    loss = self.alpha * F.cross_entropy(forward(batch.inputs), batch.labels)
                    opt.zero_grad(set_to_none=True)
                    scaler.backward(loss)
                    scaler.step(opt)
                    with torch.no_grad():
                        for m in masks.masks:
                            m.clamp_(0.0, 1.0)
        return masks

    def pruned(self, values: list[Tensor]) -> list[Tensor]:
        """Per layer, which filters to prune given their recovered masks: those at most
        `threshold`, or (`pruning_by` number) the `pruning_number` smallest of all layers
        together (ties broken by filter order)."""
        if self.pruning_by == "threshold":
            return [v <= self.threshold for v in values]
        flat = torch.cat(values)
        flags = torch.zeros(len(flat), dtype=torch.bool)
        flags[torch.sort(flat, stable=True).indices[:self.pruning_number]] = True
        return list(flags.split([len(v) for v in values]))

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        if len(data.clean) == 0:
            raise ValueError("rnp needs a clean budget (clean_fraction > 0)")
        unlearned, history = self.unlearn(model, data)
        unlearned_accuracy = accuracy(unlearned, data.clean, data)
        masks = self.recover(unlearned, data)
        values = [m.detach().flatten().cpu() for m in masks.masks]
        pruned = self.pruned(values)
        repaired = prune_filters(copy.deepcopy(model), masks.names, pruned).eval()
        figures = pruning_figures(masks.names, pruned)
        figures.update({
            "unlearning_steps": max(len(history) - 1, 0),
            "clean_budget_accuracy_unlearned": unlearned_accuracy,
            "clean_budget_accuracy_after": accuracy(repaired, data.clean, data),
        })
        # scores.png: histogram of 1 - mask (the pruned filters lie right of
        # 1 - threshold); masks.png: each filter's mask, layer after layer;
        # unlearning_curve.png: the clean accuracy of each unlearning batch.
        masks_all = torch.cat(values)
        return Repaired(model=repaired, figures=figures, artifacts={
            "scores": 1 - masks_all, "masks": masks_all,
            "unlearning_curve": torch.tensor(history)})
