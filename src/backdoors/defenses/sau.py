"""Shared Adversarial Unlearning: unlearn the adversarial examples the purified model
shares with the backdoored one."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.loader import Loader
from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import accuracy, unscaled_precision
from backdoors.execution import Accelerated, LossScaler


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence per row of two [N, K] probability tensors (clamped at
    1e-8 so that log stays finite)."""
    p, q = p.clamp(min=1e-8), q.clamp(min=1e-8)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log())).sum(1) + 0.5 * (q * (q.log() - m.log())).sum(1)


def shared_examples(pred: Tensor, ref_pred: Tensor, clean_pred: Tensor,
                    ref_clean_pred: Tensor) -> Tensor:
    """Which perturbed inputs are shared adversarial examples: both models' predictions
    moved away from their clean ones, to the same class."""
    return (pred != clean_pred) & (ref_pred != ref_clean_pred) & (pred == ref_pred)


def log_not_class(logits: Tensor, classes: Tensor) -> Tensor:
    """log(1 - softmax(logits)[i, classes[i]]) per row, computed stably as the log-sum-exp
    of the other logits minus that of all: it stays finite and has a gradient even when
    the probability of the class rounds to 1."""
    others = logits.scatter(1, classes[:, None], float("-inf"))
    return others.logsumexp(1) - logits.logsumexp(1)


def shared_adversarial_loss(adv_logits: Tensor, ref_adv_pred: Tensor, ref_clean_pred: Tensor,
                            labels: Tensor) -> Tensor:
    """The unlearning term: on the inputs whose perturbation fools the backdoored model
    (away from the label and from its clean prediction: the potential poison), minus the
    log of the purified model's probability of *not* predicting the backdoored model's
    adversarial class, summed and divided by the batch size. Inputs where that class's
    probability is already below 0.001 add nothing (the official code's clamp)."""
    potential = (ref_adv_pred != labels) & (ref_adv_pred != ref_clean_pred)
    log_rest = log_not_class(adv_logits, ref_adv_pred)
    active = potential & (log_rest < torch.log1p(torch.tensor(-0.001)))
    return -torch.where(active, log_rest, 0.0).sum() / len(labels)


def shared_pgd(model: nn.Module, reference: nn.Module, x: Tensor, y: Tensor, bound: float,
               step: float, steps: int, beta_1: float, beta_2: float) -> tuple[Tensor, Tensor]:
    """Per-input perturbations in the L-inf ball of radius `bound` that fool both models
    into the same class, by `steps` signed-gradient steps of size `step` from δ = +bound
    (the official code's `max` start). The loss descended is
    `beta_1` x (minus the cross-entropy of both models on the inputs each one is not yet
    fooled on) + `beta_2` x (the JS divergence of the two models' outputs on the inputs
    not yet shared), both divided by the batch size; it stops early once every input is
    shared. Returns (δ, which inputs were shared at the last step)."""
    with torch.no_grad():
        clean_pred, ref_clean_pred = model(x).argmax(1), reference(x).argmax(1)
    delta = torch.full_like(x, bound)
    shared = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits, ref_logits = model(x + delta), reference(x + delta)
        pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
        shared = shared_examples(pred, ref_pred, clean_pred, ref_clean_pred)
        unfooled = (pred == clean_pred).float()
        ref_unfooled = (ref_pred == ref_clean_pred).float()
        adv = -((F.cross_entropy(logits, y, reduction="none") * unfooled).sum()
                + (F.cross_entropy(ref_logits, y, reduction="none") * ref_unfooled).sum())
        divergence = (js_divergence(logits.softmax(1), ref_logits.softmax(1))
                      * (~shared).float()).sum()
        loss = (beta_1 * adv / 2 + beta_2 * divergence) / len(x)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - step * grad.sign()).clamp(-bound, bound)
        if bool(shared.all()):
            break
    return delta.detach(), shared


@DEFENSES.register("sau")
class SAU(ModelRepair):
    """Shared Adversarial Unlearning (arXiv 2307.10562).

    Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning
    Shared Adversarial Examples" (NeurIPS 2023).

    The paper bounds the backdoor risk of a purified model by its *shared* adversarial
    risk: adversarial examples that fool both the purified model and the backdoored one
    into the same class (a triggered input is one). SAU is a bi-level problem on the clean
    budget, one round per mini-batch of each of `epochs` passes:

    1. (inner max, `shared_pgd`) per-input perturbations in the L-inf ball of radius
       `norm_bound` that fool the purified model θ and the frozen backdoored model into
       the same class: `adv_steps` signed-gradient steps of size `adv_lr` from δ = +bound
       on `beta_1` x the adversarial loss + `beta_2` x the JS divergence of their outputs;
    2. (outer min) one Adam step (`lr`) of θ on `lmd_1` x CE(clean) + `lmd_2` x CE(x + δ,
       y) + `lmd_3` x the shared adversarial loss (`shared_adversarial_loss`): the
       purified model is pushed off the class the backdoored model is fooled into.

    Defaults are the official code's (BackdoorBench `defense/sau.py` and its config,
    written by the paper's first author): `epochs` 100, Adam `lr` 1e-4, `batch_size` 256,
    `norm_bound` 0.2, `adv_lr` 0.2, `adv_steps` 5, `beta_1` 0.01, `beta_2` 1, `lmd_1` 1,
    `lmd_2` 0, `lmd_3` 1, Adam's learning rate annealed by a cosine over the epochs (on a
    CPU the measurements here use fewer epochs: docs/defenses_unlearning.md). Both models stay in
    eval mode (batch norm keeps its statistics, the official default); perturbed inputs
    are not clipped to [0, 1] (as the official code, which notes it is not needed for
    backdoor defense). Uses only the clean budget.

    Precision: the models' forward passes run in the run's precision and the outer step
    uses the loss scaler under fp16. The perturbation search takes input gradients
    unscaled, so under fp16 it runs in fp32 (`unscaled_precision`).
    """

    def __init__(
        self,
        epochs: int = 100,
        lr: float = 1e-4,
        batch_size: int = 256,
        norm_bound: float = 0.2,
        adv_lr: float = 0.2,
        adv_steps: int = 5,
        beta_1: float = 0.01,
        beta_2: float = 1.0,
        lmd_1: float = 1.0,
        lmd_2: float = 0.0,
        lmd_3: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if epochs < 0 or lr <= 0 or batch_size < 1 or adv_steps < 0:
            raise ValueError("epochs and adv_steps must be >= 0, lr > 0, batch_size >= 1")
        if norm_bound <= 0 or adv_lr <= 0:
            raise ValueError(f"norm_bound and adv_lr must be > 0, got norm_bound={norm_bound}, "
                             f"adv_lr={adv_lr}")
        if min(beta_1, beta_2, lmd_1, lmd_2, lmd_3) < 0:
            raise ValueError("beta_1, beta_2, lmd_1, lmd_2 and lmd_3 must be >= 0")
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.norm_bound, self.adv_lr, self.adv_steps = norm_bound, adv_lr, adv_steps
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.lmd_1, self.lmd_2, self.lmd_3 = lmd_1, lmd_2, lmd_3

    def outer_loss(self, model: nn.Module, reference: nn.Module, x: Tensor, y: Tensor,
                   delta: Tensor) -> Tensor:
        """The unlearning objective of θ on one batch and its shared perturbations."""
        logits, adv_logits = model(torch.cat([x, x + delta])).split(len(x))
        with torch.no_grad():
            ref_clean_pred = reference(x).argmax(1)
            ref_adv_pred = reference(x + delta).argmax(1)
        loss = self.lmd_1 * F.cross_entropy(logits, y)
        if self.lmd_2:
            loss = loss + self.lmd_2 * F.cross_entropy(adv_logits, y)
        return loss + self.lmd_3 * shared_adversarial_loss(adv_logits, ref_adv_pred,
                                                           ref_clean_pred, y)

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        model = copy.deepcopy(model).eval()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        loader = Loader(data.clean, self.batch_size, data.device, shuffle=True,
                        generator=data.generator)
        # The official config anneals Adam's learning rate by a cosine over the epochs.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, self.epochs))
        search = unscaled_precision(data.precision)
        probe, ref_probe = (Accelerated(m, data.device, search) for m in (model, reference))
        forward, ref_forward = (Accelerated(m, data.device, data.precision)
                                for m in (model, reference))
        scaler = LossScaler(data.precision, data.device)
        shared_rate, last = [], torch.zeros(0)
        for _ in data.progress.phase(range(self.epochs), "unlearning shared adversarial "
                                     "examples"):
            shared = 0
            for batch in loader:
                x, y = batch.inputs, batch.labels
                delta, found = shared_pgd(probe, ref_probe, x, y, self.norm_bound, self.adv_lr,
                                          self.adv_steps, self.beta_1, self.beta_2)
                shared += int(found.sum())
                optimizer.zero_grad(set_to_none=True)
                scaler.backward(self.outer_loss(forward, ref_forward, x, y, delta))
                scaler.step(optimizer)
                last = delta[:8].cpu()
            schedule.step()
            shared_rate.append(shared / max(len(data.clean), 1))
        artifacts = {"shared_rate_curve": torch.tensor(shared_rate)} if shared_rate else {}
        if len(last):
            artifacts["perturbations"] = last
        return Repaired(model=model.eval(), figures={
            "shared_rate_first": shared_rate[0] if shared_rate else None,
            "shared_rate_last": shared_rate[-1] if shared_rate else None,
            "clean_budget_accuracy_after": accuracy(model, data.clean, data),
        }, artifacts=artifacts)
