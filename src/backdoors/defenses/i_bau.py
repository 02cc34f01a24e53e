"""I-BAU: unlearn the universal adversarial perturbation, with the implicit hypergradient."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.data.loader import Loader
from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import accuracy, unscaled_precision
from backdoors.execution import Accelerated


def implicit_hypergradient(
    params: list[Tensor],
    delta: Tensor,
    inner_loss: Callable[[Tensor], Tensor],
    outer_loss: Callable[[Tensor], Tensor],
    step: float,
    iterations: int,
) -> list[Tensor]:
    """d/dθ of outer_loss(δ*(θ)), where δ*(θ) minimises inner_loss and `delta` is (close
    to) it. Both losses are functions of δ that read θ = `params` through the model.

    δ* is a fixed point of one gradient step Φ(δ, θ) = δ - step ∇_δ inner(δ, θ), so by the
    implicit function theorem dδ*/dθ = (I - ∂Φ/∂δ)^-1 ∂Φ/∂θ and the hypergradient is
        ∂outer/∂θ + (∂Φ/∂θ)^T v,   v = (I - ∂Φ/∂δ)^-T ∂outer/∂δ.
    v is approximated by `iterations` fixed-point steps v <- (∂Φ/∂δ)^T v + ∂outer/∂δ from
    v = 0, i.e. the Neumann series of the inverse truncated after that many terms (exact
    in the limit when ∂Φ/∂δ has spectral radius < 1). Every product is a vector-Jacobian
    product through torch.autograd; no Hessian is formed.
    """
    delta = delta.detach().requires_grad_(True)
    outer = outer_loss(delta)
    *grad_params, grad_delta = _grads(outer, [*params, delta], retain_graph=False)
    (grad_inner,) = torch.autograd.grad(inner_loss(delta), delta, create_graph=True)
    mapped = delta - step * grad_inner
    v = torch.zeros_like(delta)
    for _ in range(iterations):
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jv + grad_delta
    cross = _grads(mapped, params, grad_outputs=v, retain_graph=False)
    return [g + c for g, c in zip(grad_params, cross, strict=True)]


def _grads(output: Tensor, inputs: list[Tensor], grad_outputs: Tensor | None = None,
           retain_graph: bool = True) -> list[Tensor]:
    """torch.autograd.grad with zeros for inputs the output does not depend on."""
    grads = torch.autograd.grad(output, inputs, grad_outputs=grad_outputs,
                                retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


@DEFENSES.register("i_bau")
class IBAU(ModelRepair):
    """Implicit Backdoor Adversarial Unlearning (arXiv 2110.03735).

    Zeng, Chen, Park, Mao, Jin, Jia, "Adversarial Unlearning of Backdoors via Implicit
    Hypergradient" (ICLR 2022).

    A minimax problem on the clean budget: min over the model θ of the loss under the
    worst universal perturbation δ (one pixel-space tensor added to every input). Each of
    `rounds` rounds
      1. (inner max) finds δ in the L2 ball of radius `norm_bound` by
         `perturbation_steps` steps over clean-budget batches (`perturbation`: the paper
         code's SGD on the penalised loss, or normalised-gradient PGD);
      2. (outer min) takes one Adam step (`lr`) per clean-budget batch along the implicit
         hypergradient of the outer loss CE(f(x + δ*(θ)), y) (`implicit_hypergradient`):
         δ*(θ) is taken as the fixed point of a gradient step of size `inner_step` on the
         batch's inner objective -CE(f(x + δ), y) + 0.001 |δ|² (the paper code's), and
         the inverse in the implicit function theorem is approximated by
         `fixed_point_steps` terms of its Neumann series (the fixed-point method of the
         paper's code). Only a `portion` of each outer batch carries δ in the outer loss;
         the inner objective, and with it the implicit term, sees the whole batch.
    The model stays in eval mode (BN uses its running statistics), as in the paper's code.

    Defaults are the paper's code's: `rounds` 5, `fixed_point_steps` 5, `inner_step` 0.1,
    Adam `lr` 0.001, `batch_size` 100, `portion` 0.01 (one image in a batch of 100),
    `perturbation` `sgd` with `perturbation_lr` 10 for one pass over the clean budget
    (`perturbation_steps` null); `norm_bound` 10 (the paper's L2 bound on CIFAR-10, where
    its code relies on the penalty alone). Perturbing whole outer batches (`portion` 1.0)
    is closer to the paper's formula but costs MNIST half its clean accuracy.

    Precision: forward passes run in the run's precision under bf16. Every gradient is
    taken by hand, without a loss scale (the perturbation, the hypergradient's products),
    so under fp16 the whole repair runs in fp32 (`unscaled_precision`).
    """

    REGULARIZER = 0.001  # weight of |δ|² in the inner objective (the paper's code)

    def __init__(
        self,
        rounds: int = 5,
        fixed_point_steps: int = 5,
        inner_step: float = 0.1,
        perturbation: Literal["sgd", "pgd"] = "sgd",
        perturbation_lr: float = 10.0,
        perturbation_steps: int | None = None,
        norm_bound: float = 10.0,
        lr: float = 0.001,
        batch_size: int = 100,
        portion: float = 0.01,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if rounds < 0 or fixed_point_steps < 0 or batch_size < 1:
            raise ValueError("rounds and fixed_point_steps must be >= 0, batch_size >= 1")
        if perturbation_steps is not None and perturbation_steps < 0:
            raise ValueError(f"perturbation_steps must be >= 0 (or null: one pass over the "
                             f"clean budget), got {perturbation_steps}")
        if perturbation not in ("sgd", "pgd"):
            raise ValueError(f"perturbation must be 'sgd' or 'pgd', got {perturbation!r}")
        if inner_step <= 0 or lr <= 0 or perturbation_lr <= 0:
            raise ValueError("inner_step, lr and perturbation_lr must be > 0")
        if norm_bound <= 0 or not 0.0 < portion <= 1.0:
            raise ValueError(f"norm_bound must be > 0 and portion in (0, 1], got "
                             f"norm_bound={norm_bound}, portion={portion}")
        self.rounds, self.fixed_point_steps, self.inner_step = rounds, fixed_point_steps, inner_step
        self.method, self.perturbation_lr = perturbation, perturbation_lr
        self.perturbation_steps, self.norm_bound, self.lr = perturbation_steps, norm_bound, lr
        self.batch_size, self.portion = batch_size, portion

    def inner_objective(self, model: nn.Module, x: Tensor, y: Tensor, delta: Tensor) -> Tensor:
        """What δ minimises: minus the loss under δ, plus a small |δ|² penalty."""
        return -F.cross_entropy(model(x + delta), y) + self.REGULARIZER * delta.pow(2).sum()

    def perturbation(self, model: nn.Module, batches: Iterator[Batch], steps: int,
                     data: DefenseData) -> Tensor:
        """The inner maximisation: a universal perturbation inside the L2 ball of radius
        `norm_bound`, from δ = 0, by `steps` steps on clean-budget batches, each followed by
        the projection onto the ball.

        `sgd` (the paper's code): plain SGD steps of size `perturbation_lr` down the inner
        objective -CE + 0.001 |δ|², whose optimum is then an interior stationary point, as
        the implicit hypergradient assumes. `pgd`: steps along the normalised gradient of
        CE, each 2.5 x `norm_bound` / steps long (the PGD rule of Madry et al., arXiv
        1706.06083), for models so sure of clean inputs that the plain gradient all but
        vanishes (1e-9 on the synthetic task, where `sgd` leaves δ at 0).
        """
        delta = torch.zeros(1, *data.input_shape, device=data.device)
        pgd_step = 2.5 * self.norm_bound / max(steps, 1)
        for _ in range(steps):
            batch = next(batches)
            delta.requires_grad_(True)
            if self.method == "sgd":
                objective = self.inner_objective(model, batch.inputs, batch.labels, delta)
                (grad,) = torch.autograd.grad(objective, delta)
                step = -self.perturbation_lr * grad
            else:
                loss = F.cross_entropy(model(batch.inputs + delta), batch.labels)
                (grad,) = torch.autograd.grad(loss, delta)
                step = pgd_step * grad / grad.norm().clamp_min(1e-30)
            with torch.no_grad():
                delta = delta + step
                delta = delta * min(1.0, self.norm_bound / max(float(delta.norm()), 1e-12))
        return delta.detach()

    def _patched(self, x: Tensor, delta: Tensor, generator: torch.Generator) -> Tensor:
        if self.portion >= 1.0:
            return x + delta
        rows = torch.randperm(len(x), generator=generator)[: max(1, int(self.portion * len(x)))]
        patch = torch.zeros_like(x)
        patch[rows.to(x.device)] = 1.0
        return x + patch * delta

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        model = copy.deepcopy(model).eval()
        # Every gradient here is taken by hand (the perturbation, the hypergradient's
        # vector-Jacobian products) with no loss scale, so fp16 runs in fp32.
        forward = Accelerated(model, data.device, unscaled_precision(data.precision))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        loader = Loader(data.clean, self.batch_size, data.device, shuffle=True,
                        generator=data.generator)
        norms = []
        batches = _cycle(loader)
        steps = len(loader) if self.perturbation_steps is None else self.perturbation_steps
        for _ in data.progress.phase(range(self.rounds), "unlearning a shared perturbation"):
            delta = self.perturbation(forward, batches, steps, data)
            norms.append(float(delta.norm()))
            for batch in loader:
                x, y = batch.inputs, batch.labels
                def outer(d: Tensor, x: Tensor = x, y: Tensor = y) -> Tensor:
                    return F.cross_entropy(forward(self._patched(x, d, data.generator)), y)

                def inner(d: Tensor, x: Tensor = x, y: Tensor = y) -> Tensor:
                    return self.inner_objective(forward, x, y, d)

                grads = implicit_hypergradient(params, delta, inner, outer, self.inner_step,
                                               self.fixed_point_steps)
                optimizer.zero_grad()
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                optimizer.step()
        return Repaired(model=model.eval(), figures={
            "perturbation_norms": norms,
            "clean_budget_accuracy_after": accuracy(model, data.clean, data),
        })


def _cycle(loader: Loader) -> Iterator[Batch]:
    """The loader's batches, pass after pass."""
    while True:
        yield from loader
