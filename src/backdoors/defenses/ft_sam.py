"""FT-SAM: fine-tune with (adaptive) sharpness-aware minimisation, which shrinks the large
weights a backdoor lives in."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.data.loader import Loader
from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import accuracy
from backdoors.execution import Accelerated, LossScaler, scaled
from backdoors.execution.precision import loss_scale


def smooth_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    """Mean cross-entropy against smoothed one-hot targets: 1 - `smoothing` on the label,
    `smoothing` spread evenly over the K - 1 other classes (the official code's loss)."""
    log_p = logits.log_softmax(1)
    k = logits.shape[1]
    target = torch.full_like(log_p, smoothing / max(k - 1, 1))
    target.scatter_(1, labels[:, None], 1.0 - smoothing)
    return -(target * log_p).sum(1).mean()


def sam_perturbation(params: list[Tensor], grads: list[Tensor], rho: float,
                     adaptive: bool = True, eta: float = 0.0) -> list[Tensor]:
    """The weight perturbation of (adaptive) SAM: the first-order maximiser of the loss
    over the ball ||T^-1 ε||_2 <= rho, i.e. ε = rho T² g / ||T g||, with T = |w| + eta per
    weight (ASAM, Kwon et al., arXiv 2102.11600) or T = I (SAM, Foret et al., arXiv
    2010.01412). With T = |w| a weight's radius grows with its magnitude, which is what
    FT-SAM relies on: the large weights a backdoor lives in are perturbed the most."""
    scales = [p.detach().abs() + eta if adaptive else torch.ones_like(p) for p in params]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads, strict=True)))
    factor = rho / (norm + 1e-12)
    return [factor * t * t * g for t, g in zip(scales, grads, strict=True)]


def sam_gradients(params: list[Tensor], loss_fn: Callable[[bool], Tensor], rho: float,
                  adaptive: bool = True, eta: float = 0.0) -> tuple[Tensor, list[Tensor]]:
    """(loss at w, gradient at w + ε): one SAM step's two forward-backward passes;
    `loss_fn(perturbed)` says which pass it is. The weights are perturbed in place for
    the second pass and restored before returning.

    Inside a `LossScaler.scope()` under fp16 both gradients are of the scaled losses (so
    they do not underflow) and the returned one stays scaled, for the scaler's step to
    divide out; ε needs no unscaling, as it depends on g / ||T g|| only. If the first
    gradient overflowed, it is returned as is (no perturbation): the scaler skips the step."""
    loss = loss_fn(False)
    grads = list(torch.autograd.grad(scaled(loss), params))
    if loss_scale(loss.device) is not None and not all(bool(g.isfinite().all()) for g in grads):
        return loss.detach(), grads
    eps = sam_perturbation(params, grads, rho, adaptive, eta)
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    try:
        sharp = list(torch.autograd.grad(scaled(loss_fn(True)), params))
    finally:
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)
    return loss.detach(), sharp


@contextmanager
def frozen_running_stats(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """Batch norm layers keep their running statistics within the block (momentum 0):
    the pass at the perturbed weights must not leak into them."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    if frozen:
        for m in layers:
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


def neuron_norms(model: nn.Module) -> Tensor:
    """L2 norm of each output channel's weights in the model's last Conv2d (the layer
    whose neurons the paper shows backdoors enlarge); empty when there is none."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return torch.zeros(0)
    return convs[-1].weight.detach().flatten(1).norm(dim=1).cpu()


@DEFENSES.register("ft_sam")
class FTSAM(ModelRepair):
    """FT-SAM (arXiv 2304.11823).

    Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with
    Sharpness-Aware Minimization" (ICCV 2023).

    Plain fine-tuning on a small clean set barely moves the neurons a backdoor uses; the
    paper observes they have large weight norms, and fine-tunes with adaptive SAM, whose
    perturbation radius grows with each weight's magnitude: every step takes the gradient
    at w + ε with ε = `rho` T² g / ||T g||, T = |w| + `eta` (`sam_perturbation`), so the
    large backdoor weights see the sharpest loss and shrink. The whole model is fine-tuned
    on the clean budget (train mode), with the label-smoothed cross-entropy, by SGD
    (momentum 0.9, weight decay 5e-4) along that gradient, the learning rate annealed to 0
    by a cosine over all steps.

    Defaults are the official code's (BackdoorBench `defense/ft-sam.py` and its CIFAR-10
    config, written by the paper's authors): `epochs` 100, `lr` 0.01, `batch_size` 256,
    `rho` 2.0, `adaptive` true, `eta` 0 (T = |w|, as that code; ASAM's paper adds 0.01),
    `label_smoothing` 0.1. Deviations: no data augmentation (the clean budget is used as
    is, as every repair here), and the cosine runs once over all steps (the official code
    steps its epoch-length schedule every batch, so its learning rate oscillates).
    Uses only the clean budget. Forward passes run in the run's precision; under fp16 both
    SAM gradients are taken of the scaled loss and the step goes through the loss scaler.
    """

    def __init__(
        self,
        epochs: int = 100,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 256,
        rho: float = 2.0,
        adaptive: bool = True,
        eta: float = 0.0,
        label_smoothing: float = 0.1,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if epochs < 0 or lr <= 0 or batch_size < 1:
            raise ValueError("epochs must be >= 0, lr > 0 and batch_size >= 1")
        if rho < 0 or eta < 0:
            raise ValueError(f"rho and eta must be >= 0, got rho={rho}, eta={eta}")
        if not 0.0 <= label_smoothing < 1.0 or momentum < 0 or weight_decay < 0:
            raise ValueError("label_smoothing must be in [0, 1), momentum and weight_decay "
                             ">= 0")
        self.epochs, self.lr, self.momentum = epochs, lr, momentum
        self.weight_decay, self.batch_size, self.rho = weight_decay, batch_size, rho
        self.adaptive, self.eta, self.label_smoothing = adaptive, eta, label_smoothing

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        model = copy.deepcopy(model)
        before = accuracy(model, data.clean, data)
        norms_before = neuron_norms(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        loader = Loader(data.clean, self.batch_size, data.device, shuffle=True,
                        generator=data.generator)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, self.epochs * len(loader)))
        forward = Accelerated(model, data.device, data.precision)
        scaler = LossScaler(data.precision, data.device)
        losses = []
        model.train()
        for _ in data.progress.phase(range(self.epochs), "fine-tuning with adaptive SAM on "
                                     f"{len(data.clean)} images"):
            total = 0.0
            for batch in loader:
                def loss_fn(perturbed: bool, x: Tensor = batch.inputs,
                            y: Tensor = batch.labels) -> Tensor:
                    with frozen_running_stats(model, perturbed):
                        return smooth_cross_entropy(forward(x), y, self.label_smoothing)

                with scaler.scope():
                    loss, grads = sam_gradients(params, loss_fn, self.rho, self.adaptive,
                                                self.eta)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                scaler.step(optimizer)
                schedule.step()
                total += float(loss) * len(batch.labels)
            losses.append(total / max(len(data.clean), 1))
        model.eval()
        norms_after = neuron_norms(model)
        artifacts = {"training_loss_curve": torch.tensor(losses)} if losses else {}
        figures = {"clean_budget_accuracy_before": before,
                   "clean_budget_accuracy_after": accuracy(model, data.clean, data)}
        if norms_before.numel():
            # Per channel of the last conv: after / before; the backdoor's large neurons
            # are the ones SAM should shrink most.
            artifacts["neuron_norm_ratio"] = norms_after / norms_before.clamp(min=1e-12)
            figures.update(neuron_norm_max_before=float(norms_before.max()),
                           neuron_norm_max_after=float(norms_after.max()))
        return Repaired(model=model, figures=figures, artifacts=artifacts)
