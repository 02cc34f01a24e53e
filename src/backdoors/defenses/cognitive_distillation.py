"""Cognitive Distillation: a triggered input's output is kept by a tiny part of the image."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, InputDetector

SHOWN = 8  # cognitive patterns drawn per kind of input


def total_variation(mask: Tensor) -> Tensor:
    """Per mask [N, C, H, W]: the summed squared differences of vertical and horizontal
    neighbours, divided by C * H * W (the official code's smoothness term)."""
    dh = (mask[:, :, 1:] - mask[:, :, :-1]).pow(2).sum((1, 2, 3))
    dw = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).pow(2).sum((1, 2, 3))
    return (dh + dw) / mask[0].numel()


def mask_of(param: Tensor) -> Tensor:
    """The mask in (0, 1) from its unconstrained parameter: (tanh + 1) / 2."""
    return (torch.tanh(param) + 1) / 2


def distillation_loss(out: Tensor, target: Tensor, mask: Tensor, alpha: float, beta: float,
                      p: float) -> Tensor:
    """Per input: mean |model output on the masked input - original output| + alpha *
    ||mask||_p + beta * TV(mask)."""
    keep = (out - target).abs().mean(1)
    return keep + alpha * mask.flatten(1).norm(p=p, dim=1) + beta * total_variation(mask)


@DEFENSES.register("cognitive_distillation")
class CognitiveDistillation(InputDetector):
    """Cognitive Distillation (ICLR 2023, arXiv 2301.10908): the size of the minimal pattern
    that keeps the model's output.

    Huang, Ma, Erfani, Bailey, "Distilling Cognitive Backdoor Patterns within an Image".

    For each input x a mask m in (0, 1) (one channel, H x W, m = (tanh(w) + 1) / 2 with w
    starting at 1) is optimised with Adam (`lr` 0.1, betas (0.1, 0.1)) for `steps` (100)
    steps to minimise, per input, mean |f(x * m + (1 - m) * noise) - f(x)| over the logits
    + `alpha` ||m||_p (`p` 1) + `beta` TV(m); the noise is one uniform random colour per
    image and channel, drawn afresh at every step. What remains, the cognitive pattern, is
    the part of the image the model's output rests on: a trigger is a small, simple
    pattern, so triggered inputs end with a far smaller mask than clean ones. Defaults are
    the official code's (`alpha` is its `gamma`, 0.01, the CIFAR setting; `beta` 10 as in
    its README example; logits as the distilled output, the paper's input-level variant).

    Score: the paper's test-time statistic. `fit` distils the clean budget and keeps the
    mean and standard deviation of the masks' L1 norms; an input scores
    (mean - ||m||_1) / std, the number of standard deviations its mask is smaller than
    clean ones (the paper flags scores above a threshold t; the runner reports AUROC and
    TPR at 5% FPR). The model is only read: gradients flow to the masks alone. The noise
    draws from the defense generator, so scores repeat for a given run seed. The result
    gives the mean mask norm of clean and of triggered test inputs and draws the
    cognitive patterns x * m of eight of each.

    Cost: `steps` forward and backward passes per input. On a CPU a CIFAR-10 ResNet needs
    fewer steps (30 on the CIFAR-10 run here); the masks then shrink less, clean and
    triggered alike.
    """

    def __init__(self, steps: int = 100, lr: float = 0.1, alpha: float = 0.01,
                 beta: float = 10.0, p: float = 1.0, **base: Any) -> None:
        super().__init__(**base)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if lr <= 0 or alpha < 0 or beta < 0 or p <= 0:
            raise ValueError("lr and p must be > 0, alpha and beta >= 0")
        self.steps, self.lr, self.alpha, self.beta, self.p = steps, lr, alpha, beta, p
        self._generator: torch.Generator | None = None
        self._clean: tuple[float, float] | None = None

    def distil(self, model: nn.Module, x: Tensor) -> Tensor:
        """The distilled masks [N, 1, H, W] of the pixel batch x."""
        if self._generator is None:
            raise RuntimeError("call fit(model, data) before distilling")
        was_training = model.training
        model.eval()
        with torch.no_grad():
            target = model(x)
        param = torch.ones(len(x), 1, *x.shape[2:], device=x.device, requires_grad=True)
        optimizer = torch.optim.Adam([param], lr=self.lr, betas=(0.1, 0.1))
        for _ in range(self.steps):
            noise = torch.rand(len(x), x.shape[1], 1, 1, generator=self._generator)
            with torch.enable_grad():  # the runner scores under no_grad
                mask = mask_of(param)
                noisy = x * mask + (1 - mask) * noise.to(x.device, x.dtype)
                loss = distillation_loss(model(noisy), target, mask, self.alpha, self.beta,
                                         self.p)
                # Gradients to the mask only: the model's parameters' .grad stay untouched.
                (grad,) = torch.autograd.grad(loss.mean(), [param])
            param.grad = grad
            optimizer.step()
        model.train(was_training)
        return mask_of(param).detach()

    def norms(self, model: nn.Module, x: Tensor) -> Tensor:
        """L1 norm of each input's distilled mask."""
        return self.distil(model, x).flatten(1).sum(1)

    def fit(self, model: nn.Module, data: DefenseData) -> None:
        self._generator = data.generator
        if len(data.clean) < 2:
            raise ValueError("cognitive_distillation needs at least 2 clean-budget images")
        norms = torch.cat([self.norms(model, batch.inputs).cpu() for batch in
                           data.progress.phase(data.loader(data.clean),
                                               "distilling clean-budget masks")])
        mean, std = float(norms.mean()), float(norms.std())
        self._clean = (mean, max(std, 1e-12))
        self.figures = {"budget_mask_l1_mean": mean, "budget_mask_l1_std": std}

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        if self._clean is None:
            raise RuntimeError("call fit(model, data) before score(model, x)")
        masks = self.distil(model, x)
        self.keep(torch.cat([x * masks, masks], 1))  # the cognitive pattern, then the mask
        mean, std = self._clean
        return ((mean - masks.flatten(1).sum(1)) / std).float().cpu()

    def describe(self, kept: Tensor, positive: Tensor) -> None:
        """Mean mask L1 norm of clean and of triggered inputs, and the cognitive patterns
        x * m of the first `SHOWN` of each (image grids)."""
        for label, rows in (("clean", kept[~positive]), ("triggered", kept[positive])):
            if len(rows):
                self.figures[f"{label}_mask_l1_mean"] = float(rows[:, -1].flatten(1).sum(1).mean())
                self.artifacts[f"patterns_{label}"] = rows[:SHOWN, :-1]
