"""Balancers: turn named losses into parameter gradients and report the scales used."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor, nn

from backdoors.attacks.mgda import gradient_normalizers, min_norm_weights
from backdoors.execution.precision import loss_scale, scaled
from backdoors.registry import Registry

BALANCERS: Registry[Balancer] = Registry("balancer")


class Balancer(ABC):
    """Combines loss terms: `backward(losses, params)` fills `.grad` and returns the scales."""

    @abstractmethod
    def backward(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> dict[str, float]:
        """Accumulate the gradient of the weighted loss into `params` and return the weights."""

    @abstractmethod
    def weights(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> dict[str, float]:
        """The weights `backward` would use, leaving `.grad` alone: DP-SGD decides them once
        on the batch and holds them fixed while it differentiates each sample."""


@BALANCERS.register("fixed")
class FixedBalancer(Balancer):
    """Fixed weights: total = sum of scale[t] * loss[t] (Backdoors 101 `loss_balance: fixed`).

    `scales` maps term names to weights; terms not listed get weight 1.
    """

    def __init__(self, scales: dict[str, float] | None = None) -> None:
        self.scales = dict(scales or {})

    def weights(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> dict[str, float]:
        return {t: float(self.scales.get(t, 1.0)) for t in losses}

    def backward(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> dict[str, float]:
        scales = self.weights(losses, params)
        total = sum(scales[t] * loss for t, loss in losses.items())
        scaled(total).backward()  # type: ignore[arg-type]
        return scales


@BALANCERS.register("mgda")
class MGDABalancer(Balancer):
    """MGDA weights (Sener & Koltun, arXiv 1810.04650), as in Blind Backdoors (2005.03823).

    Each term's gradient is divided by its normaliser (`normalize`: l2, loss, loss+ or
    none; default loss+ would be CIFAR's, Backdoors 101's MNIST config uses loss), the
    min-norm convex combination of the normalised gradients gives the weights, and the
    weighted sum of the raw gradients becomes the update. The per-term gradients are
    reused for that sum, so no extra backward pass is needed (the original ran one more).

    Under fp16 loss scaling the term gradients are taken of the scaled losses (so they do
    not underflow) and divided by the scale before the min-norm solve, which then sees
    true gradients; the combined update stays scaled for the scaler's optimizer step. A
    step whose gradients overflowed is skipped by the scaler; its weights are reported
    as uniform rather than as the solve's nan.
    """

    def __init__(self, normalize: Literal["l2", "loss", "loss+", "none", "eq"] = "loss") -> None:
        self.normalize = normalize

    def _solve(self, losses: dict[str, Tensor], params: list[nn.Parameter]
               ) -> tuple[Tensor, Tensor]:
        """(weights [T], flat term gradients [T, P], as scaled as the losses differentiated)
        for two or more terms."""
        names = list(losses)
        grads = []
        for i, name in enumerate(names):
            g = torch.autograd.grad(
                scaled(losses[name]), params, retain_graph=i < len(names) - 1,
                allow_unused=True
            )
            grads.append(torch.cat([
                (gi if gi is not None else torch.zeros_like(p)).flatten()
                for gi, p in zip(g, params, strict=True)
            ]))
        flat = torch.stack(grads)  # [T, P]
        with torch.no_grad():
            scale = loss_scale(flat.device)
            true = flat if scale is None else flat / scale
            if scale is not None and not bool(torch.isfinite(true).all()):
                return torch.full((len(names),), 1.0 / len(names), dtype=flat.dtype), flat
            norms = true.norm(dim=1)
            values = torch.stack([losses[n].detach() for n in names])
            divisors = gradient_normalizers(values, norms, self.normalize).clamp(min=1e-12)
            normalised = true / divisors[:, None]
            weights = min_norm_weights(normalised @ normalised.T).to(flat.dtype)
        return weights, flat

    def weights(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> dict[str, float]:
        if len(losses) == 1:
            return {name: 1.0 for name in losses}
        weights, _ = self._solve(losses, params)
        return {n: float(w) for n, w in zip(losses, weights, strict=True)}

    def backward(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> dict[str, float]:
        names = list(losses)
        if len(names) == 1:
            scaled(losses[names[0]]).backward()
            return {names[0]: 1.0}
        weights, flat = self._solve(losses, params)
        with torch.no_grad():
            combined = weights @ flat
        offset = 0
        for p in params:
            n = p.numel()
            g = combined[offset : offset + n].view_as(p)
            p.grad = g.clone() if p.grad is None else p.grad + g
            offset += n
        return {n: float(w) for n, w in zip(names, weights, strict=True)}
