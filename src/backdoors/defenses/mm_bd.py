"""MM-BD: a backdoor target class reaches an abnormally large logit margin, found
without any data."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, ModelInspector
from backdoors.defenses.results import Inspection
from backdoors.defenses.scores import MAD_CONSISTENCY


def margin(logits: Tensor, target: int) -> Tensor:
    """Per row: the logit of `target` minus the largest other logit."""
    others = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    others[target] = False
    return logits[:, target] - logits[:, others].amax(1)


def order_pvalue(log_cdf: float, count: int) -> float:
    """P(max of `count` i.i.d. null draws >= the observed value) = 1 - F(x)^count, from
    log F(x) (computed as -expm1(count log F) so tiny p-values keep their digits)."""
    return float(-math.expm1(count * log_cdf))


def gamma_pvalue(statistics: Tensor) -> tuple[int, float, tuple[float, float, float]]:
    """MM-BD's detection inference on the per-class statistics: the largest one is tested
    against a gamma distribution (shape, location, scale: maximum likelihood, as the
    official code's scipy `gamma.fit`) fitted on the other K - 1, with the order-statistic
    p-value of a maximum of K draws. Returns (class of the largest, p-value, gamma
    parameters); the p-value is 1 when the null cannot be fitted (fewer than two distinct
    values, or a failed fit)."""
    from scipy.stats import gamma

    values = statistics.double().cpu().numpy()
    top = int(values.argmax())
    null = np.delete(values, top)
    if len(np.unique(null)) < 2:
        return top, 1.0, (math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # MLE of a tiny sample may wander
        try:
            params = tuple(float(p) for p in gamma.fit(null))
        except (ValueError, RuntimeError, FloatingPointError):
            return top, 1.0, (math.nan, math.nan, math.nan)
        log_cdf = float(gamma.logcdf(values[top], *params))
    if not math.isfinite(log_cdf) or not all(math.isfinite(p) for p in params):
        return top, 1.0, params
    return top, order_pvalue(log_cdf, len(values)), params


def signed_index(values: Tensor) -> Tensor:
    """(x - median) / (1.4826 MAD): the MAD anomaly index keeping its sign, a monotone
    transform of the statistic (large margins are what MM-BD looks for)."""
    values = values.double()
    median = values.quantile(0.5)
    mad = MAD_CONSISTENCY * (values - median).abs().quantile(0.5)
    return (values - median) / mad.clamp(min=1e-12)


def max_margin(model: nn.Module, target: int, start: Tensor, steps: int, lr: float,
               tolerance: float) -> tuple[Tensor, Tensor]:
    """Gradient ascent on sum of margin(model(x), target) over the starts x (a batch of
    pixel images), each step projected back onto the pixel box [0, 1]; stops early when
    the objective changes by less than `tolerance` of itself. Returns the margin of each
    start at the end and the images reached."""
    x = start.clone().requires_grad_(True)
    last = math.inf
    for _ in range(steps):
        objective = margin(model(x), target).sum()
        # Gradient with respect to the inputs only: the model's weights get no .grad.
        (grad,) = torch.autograd.grad(objective, [x])
        with torch.no_grad():
            x.add_(lr * grad).clamp_(0.0, 1.0)
        value = float(objective.detach())
        if math.isfinite(last) and abs(last - value) <= tolerance * abs(last):
            break
        last = value
    x = x.detach()
    with torch.no_grad():
        return margin(model(x), target), x


@DEFENSES.register("mm_bd")
class MMBD(ModelInspector):
    """MM-BD (IEEE S&P 2024, arXiv 2205.06900): the backdoor target's maximum margin.

    Wang, Xiang, Miller, Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks
    with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic".

    Uses no data at all (`uses_clean_data = False`): a backdoor makes its target class
    reachable with an abnormally large logit margin from anywhere in input space, whatever
    the trigger's form. For each class k the statistic is the maximum over the pixel box
    [0, 1] of the margin logit_k(x) - max_{j != k} logit_j(x), estimated by gradient ascent
    from `starts` (30) uniform random images, `steps` (300) steps of size `lr` (0.01),
    stopping early when the summed margin changes by less than `tolerance` (1e-5) of itself
    (all four from the official code). Detection: a gamma distribution (maximum
    likelihood, free location, as the official code) is fitted to the K - 1 statistics
    other than the largest, and the largest gets the order-statistic p-value
    1 - F(r_max)^K; the model is called backdoored, and the class of r_max flagged, when
    p < `alpha` (0.05, the paper's threshold).

    Deviations: the official code re-creates its SGD optimizer (momentum 0.2) every
    step, so its momentum never acts; here the same plain gradient steps are taken. It
    keeps images in the box by clamping them inside the forward pass (a pixel that leaves
    the box stops moving); here each step is projected onto the box. The statistic is the
    margin at the final point rather than at the last evaluated one.

    Anomaly index: the signed MAD index of the statistics, (r - median) / (1.4826 MAD),
    a monotone transform of them. Figures: `margins` (the statistic per class),
    `p_value`, `backdoored`, `detected_class`, `null_gamma` (shape, location, scale).
    Artifacts: `margins` (bars) and `max_margin_inputs` (the best start of each class).
    """

    uses_clean_data = False

    def __init__(self, starts: int = 30, steps: int = 300, lr: float = 0.01,
                 tolerance: float = 1e-5, alpha: float = 0.05, **base: Any) -> None:
        super().__init__(**base)
        if starts < 1 or steps < 1:
            raise ValueError(f"starts and steps must be >= 1, got {starts} and {steps}")
        if lr <= 0 or tolerance < 0:
            raise ValueError(f"lr must be > 0 and tolerance >= 0, got {lr} and {tolerance}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.starts, self.steps, self.lr = starts, steps, lr
        self.tolerance, self.alpha = tolerance, alpha

    def inspect(self, model: nn.Module, data: DefenseData) -> Inspection:
        model.eval()
        margins, inputs = [], []
        classes = data.progress.phase(range(data.num_classes),
                                      "maximising the margin of each class")
        for k in classes:
            start = torch.rand(self.starts, *data.input_shape, generator=data.generator)
            found, reached = max_margin(model, k, start.to(data.device), self.steps,
                                        self.lr, self.tolerance)
            margins.append(found.max().cpu())
            inputs.append(reached[found.argmax()].cpu())
        statistics = torch.stack(margins)
        top, p_value, params = gamma_pvalue(statistics)
        flagged = [top] if p_value < self.alpha else []
        return Inspection(
            anomaly_index=signed_index(statistics).float(), flagged=flagged,
            figures={"margins": statistics.tolist(), "p_value": p_value,
                     "backdoored": bool(flagged), "detected_class": top if flagged else None,
                     "null_gamma": list(params)},
            artifacts={"margins": statistics,
                       "max_margin_inputs": torch.stack(inputs)},
        )
