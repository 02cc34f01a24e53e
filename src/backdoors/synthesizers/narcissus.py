"""Narcissus: a clean-label trigger optimised on target-class data through a surrogate."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.data.dataset import Dataset
from backdoors.errors import ConfigError
from backdoors.synthesizers.base import SYNTHESIZERS
from backdoors.synthesizers.surrogate import (
    OptimisedSynthesizer,
    TrainingRows,
    in_memory,
    resolve,
)


@SYNTHESIZERS.register("narcissus")
class NarcissusSynthesizer(OptimisedSynthesizer):
    """Narcissus (Zeng et al., "Narcissus: A Practical Clean-Label Backdoor Attack with
    Limited Information", arXiv 2204.05255): an additive universal trigger that makes a
    surrogate more confident in the target class, poisoned onto target-class images.

    Clean-label: use it with the data attack's `clean_label: true` and a tiny ratio (the
    paper poisons 0.05% of CIFAR-10). `prepare()` trains a surrogate, then optimises an
    additive trigger delta, |delta| <= `eps` (16/255), that minimises the surrogate's
    cross-entropy toward the target on target-class training images: `trigger_steps` (500)
    signed-gradient steps of `step_size` (1/255) on random mini-batches, projected back to
    the eps-ball. `target_samples` limits how many target-class images the attacker knows
    (default: all of them). Poisoned training rows get x + delta; test inputs get the
    magnified x + `test_magnification` * delta (x3 in the paper). Clean-label training
    images have the target label anyway, so the model learns delta as the strongest
    target feature.

    Simplification: the paper's surrogate is pre-trained on public out-of-distribution data
    (POOD) and fine-tuned on the target-class samples; here it is trained on the task's
    own training set. Before `prepare()`, delta is an un-optimised uniform draw in the
    eps-ball (seed 0), so the synthesizer works but carries no optimised backdoor.
    """

    def __init__(
        self,
        eps: float = 16 / 255,
        test_magnification: float = 3.0,
        trigger_steps: int = 500,
        step_size: float = 1 / 255,
        target_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < eps <= 1.0 or test_magnification <= 0 or step_size <= 0:
            raise ValueError("need 0 < eps <= 1, test_magnification > 0 and step_size > 0")
        if trigger_steps < 0 or (target_samples is not None and target_samples < 1):
            raise ValueError("need trigger_steps >= 0 and target_samples >= 1")
        self.eps, self.test_magnification = eps, test_magnification
        self.trigger_steps, self.step_size, self.target_samples = (
            trigger_steps, step_size, target_samples)
        self.delta = self._initial(torch.Generator().manual_seed(0))

    def bind(self, input_shape: Any, num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        self.delta = self._initial(torch.Generator().manual_seed(0))

    def _initial(self, generator: torch.Generator) -> Tensor:
        return (torch.rand(self.input_shape, generator=generator) * 2 - 1) * self.eps

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        self.require_all_to_one()
        data = in_memory(train, self.name)
        self.rows = TrainingRows(data.images)
        model = self.fit_surrogate(data, generator)
        device = resolve(self.device)
        pool = (data.labels == self.target).nonzero().flatten()
        if len(pool) == 0:
            raise ConfigError(f"synthesizer narcissus: no training images of target class "
                              f"{self.target}")
        if self.target_samples is not None:
            pool = pool[torch.randperm(len(pool), generator=generator)[: self.target_samples]]
        images = data.images[pool].float().div(255).to(device)
        labels = torch.full((len(pool),), self.target, device=device)
        delta = self._initial(generator).to(device)
        for _ in range(self.trigger_steps):
            pick = torch.randint(0, len(pool), (min(self.batch_size, len(pool)),),
                                 generator=generator).to(device)
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((images[pick] + delta).clamp(0, 1)), labels[pick])
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() - self.step_size * grad.sign()).clamp(-self.eps, self.eps)
        self.delta = delta.detach().cpu()

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        training = (self.rows.find(x) >= 0).to(x.device)
        scale = torch.where(training, 1.0, self.test_magnification).to(x).view(-1, 1, 1, 1)
        return (x + scale * self.delta.to(x)).clamp(0, 1)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"delta": self.delta}

    def spec(self) -> dict:
        return {**super().spec(), "eps": self.eps,
                "test_magnification": self.test_magnification}
