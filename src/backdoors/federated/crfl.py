"""CRFL (Xie et al., "CRFL: Certifiably Robust Federated Learning against Backdoor
Attacks", ICML 2021, arXiv 2106.08283).

Training: after aggregation the server clips the new *global parameters* to L2 norm rho
and adds Gaussian noise of std sigma to them, every round. Testing: parameter smoothing,
the majority vote of M copies of the final model with Gaussian noise on its parameters;
the gap between the top two classes' vote shares certifies how far the parameters (and
so, through the training dynamics, a bounded backdoor) can move without changing the
smoothed prediction. Defaults from the official code's MNIST configs (AI-secure/CRFL):
rho 15 (param_clip_thres), sigma 0.01 (sigma_param, test_sigma), alpha 0.001; the paper
draws M = 1000 noisy models, 20 here by default so that a CPU run certifies in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, RoundContext
from backdoors.federated.wrappers import InnerSpec, Wrapper


def crfl_params(params: Tensor, clip: float, sigma: float,
                generator: torch.Generator | None = None) -> Tensor:
    """The new global parameters scaled down to L2 norm <= `clip`, plus Gaussian noise of
    std `sigma` on every coordinate."""
    clipped, _ = rules.clip_norms(params[None], clip)
    return rules.add_gaussian_noise(clipped[0], sigma, generator)


def certified_radius(p_top: Tensor, p_second: Tensor, sigma: float) -> Tensor:
    """The parameter-space radius of CRFL's bound for bounds p_top > p_second on the two
    largest class probabilities of the smoothed model: sigma * sqrt(-ln(1 - (sqrt(p_top)
    - sqrt(p_second))^2) / 2), the official certify code's expression before it divides by
    the training constants (local iterations, Lipschitz constant, scale factor, learning
    rate, poisoned share of a batch, clipping contraction) that turn it into a trigger
    magnitude; 0 where p_top <= p_second (abstain)."""
    gap = (p_top.sqrt() - p_second.sqrt()).clamp(min=0) ** 2
    radius = sigma * (-torch.log1p(-gap.clamp(max=1 - 1e-12)) / 2).sqrt()
    return torch.where(p_top > p_second, radius, torch.zeros_like(radius))


@torch.no_grad()
def crfl_certify(model_fn: Callable[[Tensor], nn.Module], params: Tensor, sigma: float,
                 samples: int, inputs: Tensor, alpha: float = 0.001,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """CRFL's parameter smoothing of the model `model_fn(params)` on `inputs`.

    Votes of `samples` (M) copies with N(0, sigma^2) noise on the parameters; the top two
    classes' vote shares are bounded with Hoeffding's inequality at level `alpha`
    (+-sqrt(ln(1/alpha) / 2M), as the official code) and turned into a radius
    (`certified_radius`). Returns (predicted class, -1 where abstaining; radius)."""
    counts: Tensor | None = None
    for _ in range(samples):
        noise = torch.randn(params.shape, generator=generator, dtype=params.dtype)
        logits = model_fn(params + sigma * noise.to(params.device))(inputs)
        votes = nn.functional.one_hot(logits.argmax(1), logits.shape[1])  # [n, classes]
        counts = votes if counts is None else counts + votes
    assert counts is not None
    top = counts.double().topk(2, dim=1)
    share = top.values / samples
    margin = math.sqrt(math.log(1 / alpha) / (2 * samples))
    p_top = (share[:, 0] - margin).clamp(min=1e-8)
    p_second = (share[:, 1] + margin).clamp(max=1 - 1e-8)
    radius = certified_radius(p_top, p_second, sigma)
    predicted = torch.where(radius > 0, top.indices[:, 0], torch.full_like(top.indices[:, 0],
                                                                            -1))
    return predicted, radius.float()


def _first_rows(loader: Any, n: int) -> tuple[Tensor, Tensor]:
    """The first `n` inputs and labels of a test loader."""
    inputs, labels, have = [], [], 0
    for batch in loader:
        inputs.append(batch.inputs)
        labels.append(batch.labels)
        have += len(batch.labels)
        if have >= n:
            break
    return torch.cat(inputs)[:n], torch.cat(labels)[:n]


@AGGREGATORS.register("crfl")
class CRFL(Wrapper):
    """CRFL: clip and noise the global parameters every round (arXiv 2106.08283).

    Xie et al., ICML 2021: the `inner` rule's new global model (default fedavg, the
    paper's mean) is scaled down to parameter norm <= `clip` (default 15, the official
    MNIST param_clip_thres) and Gaussian noise of std `sigma` (default 0.01) added to its
    parameters. Certificate: at the last round (and every `certify_every` rounds when set)
    the model is smoothed with `smoothing_models` noisy copies (default 20; the paper
    uses 1000) on the first `certify_samples` test inputs (default 100) at level `alpha`
    (default 0.001), reported as `crfl_certified_accuracy` (correct and not abstaining)
    and `crfl_mean_radius` (the parameter-space radius, 0 where abstaining or wrong).
    Judges no client itself (the inner rule's flags are kept)."""

    def __init__(self, clip: float = 15.0, sigma: float = 0.01, inner: InnerSpec = "fedavg",
                 certify_every: int | None = None, certify_samples: int = 100,
                 smoothing_models: int = 20, alpha: float = 0.001) -> None:
        if clip <= 0 or sigma < 0:
            raise ValueError(f"clip must be > 0 and sigma >= 0, got {clip} and {sigma}")
        if certify_every is not None and certify_every < 1:
            raise ValueError(f"certify_every must be >= 1, got {certify_every}")
        if certify_samples < 1 or smoothing_models < 2:
            raise ValueError("certify_samples must be >= 1 and smoothing_models >= 2, got "
                             f"{certify_samples} and {smoothing_models}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        super().__init__(inner)
        self.clip, self.sigma, self.certify_every = clip, sigma, certify_every
        self.certify_samples, self.smoothing_models, self.alpha = (
            certify_samples, smoothing_models, alpha)
        self.params: Tensor | None = None

    @property  # type: ignore[override]
    def needs_server(self) -> bool:
        return True  # the global parameters, a scratch model and the test set

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        if ctx.server is None:
            raise ValueError("crfl needs the server's view (the global parameters)")
        out = self.inner.aggregate(updates, ctx)
        start = ctx.server.global_params.to(updates.device)
        self.params = crfl_params(start + out.delta, self.clip, self.sigma, ctx.generator)
        return Aggregate(self.params - start, out.coefficients, out.flagged)

    def _certifies(self, ctx: RoundContext) -> bool:
        every = self.certify_every is not None and ctx.round % self.certify_every == 0
        return every or (ctx.last > 0 and ctx.round == ctx.last)

    def report(self, ctx: RoundContext) -> dict[str, float]:
        out = super().report(ctx)
        if ctx.server is None or self.params is None or not self._certifies(ctx):
            return out
        inputs, labels = _first_rows(ctx.server.test_loader, self.certify_samples)
        predicted, radius = crfl_certify(ctx.server.model_with, self.params, self.sigma,
                                         self.smoothing_models, inputs, self.alpha,
                                         ctx.generator)
        correct = predicted.cpu() == labels.cpu()
        out["crfl_certified_accuracy"] = float(correct.float().mean())
        out["crfl_mean_radius"] = float(torch.where(correct, radius.cpu(), 0.0).mean())
        return out
