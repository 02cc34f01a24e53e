"""DP-SGD: per-sample clipping and Gaussian noise around any attack's training step.

Abadi et al., "Deep Learning with Differential Privacy" (arXiv 1607.00133), Algorithm 1:
each privacy unit's gradient over all trainable parameters is clipped to L2 norm C
(`clip`, default 1.0), the clipped gradients are summed, Gaussian noise N(0, sigma^2 C^2)
is added to every coordinate (`sigma` is the noise multiplier, default 1.0) and the sum
is divided by the batch size. The optimizer then steps as usual.

Per-sample gradients come from torch.func (functional_call + vmap(grad)) over the
attack's `PerSampleStep`, so any attack that can state its loss per sample runs under
DP unchanged, and the trainer never learns that DP is on: `DPSGD` wraps the attack
(Opacus's "wrap, don't rewrite", without its GradSampleModule). Batch norm mixes the
samples of a batch, so models with it are refused, as Opacus does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from backdoors.attacks.base import Attack, PerSampleAttack, PerSampleStep, StepReport
from backdoors.batch import Batch
from backdoors.data.dataset import Dataset
from backdoors.errors import ConfigError
from backdoors.synthesizers.base import Synthesizer

# Keeps the clip factor finite for an all-zero gradient (Opacus uses the same guard).
NORM_EPS = 1e-6


def per_sample_gradients(
    model: nn.Module, step: PerSampleStep
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Gradients of each unit's scaled loss w.r.t. every trainable parameter, as
    {name: [N, *shape]}, and each unit's term losses {term: [N]}."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def unit_loss(trainable: dict[str, Tensor], *unit: Tensor
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        def forward(x: Tensor) -> Tensor:
            return functional_call(model, (trainable, fixed), (x,))

        terms = step.losses(forward, *unit)
        total = sum(step.scales[t] * loss for t, loss in terms.items())
        return total, {t: loss.detach() for t, loss in terms.items()}  # type: ignore[return-value]

    in_dims = (None, *(0 for _ in step.rows))
    # randomness="different": dropout draws its own mask for every sample, as in a batch.
    per_unit = vmap(grad(unit_loss, has_aux=True), in_dims=in_dims, randomness="different")
    return per_unit(params, *step.rows)


def clip_and_sum(grads: dict[str, Tensor], clip: float) -> tuple[dict[str, Tensor], Tensor]:
    """Scale each unit's gradient to L2 norm <= clip (norm over all parameters together)
    and sum over units. Returns ({name: summed gradient}, per-unit norms before clipping)."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    factors = (clip / (norms + NORM_EPS)).clamp(max=1.0)
    return {n: torch.einsum("n,n...->...", factors, g) for n, g in grads.items()}, norms


def gaussian_noise(like: dict[str, Tensor], std: float, generator: torch.Generator
                   ) -> dict[str, Tensor]:
    """Independent N(0, std^2) noise shaped like each tensor of `like`."""
    return {n: torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype) * std
            for n, t in like.items()}


def dp_blocker(model: nn.Module, attack: Attack) -> str | None:
    """Why DP-SGD cannot train this model with this attack, or None."""
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        name = getattr(type(model), "registry_name", type(model).__name__)
        return (f"model '{name}' has batch norm, which mixes the samples of a batch, so "
                "per-sample gradients are undefined (Opacus refuses it too); use a model "
                "without batch norm (e.g. simple_net)")
    if not isinstance(attack, PerSampleAttack):
        return f"attack '{attack.name}' cannot state its loss per sample"
    return attack.dp_blocker()


class DPSGD(Attack):
    """Runs an attack's step as DP-SGD (Abadi et al., arXiv 1607.00133); see the module
    docstring. Delegates everything else to the wrapped attack.

    `clip` (C, default 1.0), `sigma` (noise multiplier, default 1.0; 0 clips without
    noise). Noise draws from its own generator seeded with `seed`, checkpointed with the
    wrapped attack's state, so a resumed run continues the same noise stream. `steps`
    counts noisy steps for the privacy accountant.
    """

    def __init__(self, attack: Attack, model: nn.Module, clip: float = 1.0,
                 sigma: float = 1.0, seed: int = 0) -> None:
        reason = dp_blocker(model, attack)
        if reason is not None:
            raise ConfigError(f"train.dp: {reason}; or set train.dp: false")
        if clip <= 0 or sigma < 0:
            raise ConfigError(f"train.dp_clip must be > 0 and train.dp_sigma >= 0, got "
                              f"{clip} and {sigma}")
        self.attack: PerSampleAttack = attack  # type: ignore[assignment]
        self.clip, self.sigma, self.seed = clip, sigma, seed
        self.steps = 0
        self.generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    @property
    def name(self) -> str:
        return self.attack.name

    @property
    def synthesizer(self) -> Synthesizer:  # type: ignore[override]
        return self.attack.synthesizer

    def bind(self, synthesizer: Synthesizer, model: nn.Module) -> None:
        self.attack.bind(synthesizer, model)

    def start(self, model: nn.Module) -> None:
        self.attack.start(model)

    def poison_training_set(
        self, dataset: Dataset, generator: torch.Generator
    ) -> tuple[Dataset, Tensor]:
        return self.attack.poison_training_set(dataset, generator)

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_state is not None:
                self.generator.set_state(self._pending_state)
                self._pending_state = None
        return self.generator

    def backward(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> StepReport:
        step = self.attack.per_sample_step(model, batch, generator)
        grads, unit_losses = per_sample_gradients(model, step)
        n = step.rows[0].shape[0]
        total, _ = clip_and_sum(grads, self.clip)
        if self.sigma > 0:
            device = next(iter(total.values())).device
            noise = gaussian_noise(total, self.sigma * self.clip, self._noise_generator(device))
            total = {name: g + noise[name] for name, g in total.items()}
        params = dict(model.named_parameters())
        for name, g in total.items():
            p = params[name]
            p.grad = g / n if p.grad is None else p.grad + g / n
        self.steps += 1
        losses = {t: float(v.mean()) for t, v in unit_losses.items()}
        return StepReport(losses, step.scales)

    def state_dict(self) -> dict[str, Any]:
        noise = self.generator.get_state() if self.generator is not None else self._pending_state
        return {"attack": self.attack.state_dict(), "dp_steps": self.steps,
                "noise_generator": noise}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.attack.load_state_dict(state["attack"])
        self.steps = int(state["dp_steps"])
        noise = state.get("noise_generator")
        if noise is not None and self.generator is not None:
            self.generator.set_state(noise)
        else:
            self._pending_state = noise
