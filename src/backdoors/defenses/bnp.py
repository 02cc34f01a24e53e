"""Batch-Norm statistics-based Pruning: prune the neurons whose clean pre-activations
disagree with the statistics batch norm stored during (poisoned) training."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.channels import batch_norms, prune_outliers, reduce_pre_activations
from backdoors.defenses.results import Repaired


def gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) entry by entry, in nats."""
    return (0.5 * (var_q / var_p).log() + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q)
            - 0.5)


def channel_sums(x: Tensor) -> Tensor:
    """[3, C]: count, sum and sum of squares per channel of a batch [N, C, ...] (float64,
    so the moments of a whole dataset can be summed batch by batch)."""
    x = x.detach().double().transpose(0, 1).flatten(1)
    return torch.stack([torch.full((len(x),), float(x.shape[1]), dtype=x.dtype,
                                   device=x.device), x.sum(1), (x * x).sum(1)])


def moments(sums: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance per channel from summed `channel_sums`."""
    n, total, squares = sums
    mean = total / n
    return mean, (squares - n * mean * mean) / (n - 1).clamp(min=1)


@DEFENSES.register("bnp")
class BNP(ModelRepair):
    """Batch-Norm statistics-based Pruning (BNP), NeurIPS 2022 (OpenReview wwW-1k1ljIg).

    Zheng, Tang, Li, Liu, "Pre-activation Distributions Expose Backdoor Neurons",
    NeurIPS 2022 (no arXiv version; openreview.net/forum?id=wwW-1k1ljIg).

    A backdoor neuron's pre-activation follows two distributions with very different
    moments: one on benign inputs and one on poisoned ones. The running statistics a
    batch-norm layer stored during training were computed on the poisoned training set,
    so they describe the mixture, while the clean budget shows the benign population
    alone. For every channel of every BatchNorm2d, the pre-activation (the BN's input) is
    modelled as a Gaussian twice: N(mu_c, var_c) from the clean budget (mean and variance
    over samples and positions, the model in eval mode) and N(mu_bn, var_bn) from the
    BN's running statistics; the score is KL(N(mu_c, var_c) || N(mu_bn, var_bn))
    (`gaussian_kl`). Channels whose score exceeds mean + `u` x std of their layer's scores
    are pruned: their BN scale is zeroed (they output their shift only), as in the
    paper's code. No fine-tuning follows.

    `u` (default 3): the paper's code's default, also BackdoorBench's.

    Deviations: the paper's code takes the statistics of one batch of 500 clean images;
    here the whole clean budget (its size is `clean_fraction`, 5% of the training set:
    400 images on the MNIST split), batched. The BN's own eps is added to both variances,
    as the BN itself divides by var + eps, so a channel the clean data never moves cannot
    divide by zero.

    Needs batch norm: BN's running statistics are the only record of the training
    distribution a data-free-of-training-set defense has, so a model without any
    (simple_net, the MNIST default) is refused with a ConfigError naming it; use a model
    with batch norm (`model: {name: resnet18}` or `tiny_cnn`).

    Figures: `scores.png` (histogram of the per-channel KL, standardised within each
    layer) and `kl_standardised.png` (the same per channel, layer after layer).
    """

    def __init__(self, u: float = 3.0, **base: Any) -> None:
        super().__init__(**base)
        if u < 0:
            raise ValueError(f"u must be >= 0 (prune channels above mean + u * std), got {u}")
        self.u = u

    def scores(self, model: nn.Module, norms: list[tuple[str, nn.BatchNorm2d]],
               data: DefenseData) -> list[Tensor]:
        """KL divergence per channel of each BN layer (CPU, float64)."""
        if len(data.clean) < 2:
            raise ValueError("bnp needs at least 2 clean images to estimate a variance; "
                             f"the clean budget has {len(data.clean)}")
        sums = reduce_pre_activations(model, [m for _, m in norms], data.clean, data,
                                      channel_sums, "clean pre-activation statistics")
        out = []
        for (_, norm), batches in zip(norms, sums, strict=True):
            mean, var = moments(torch.stack(batches).sum(0))
            eps = norm.eps
            out.append(gaussian_kl(mean, var + eps, norm.running_mean.double().cpu(),
                                   norm.running_var.double().cpu() + eps))
        return out

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        model = copy.deepcopy(model).eval()
        norms = batch_norms(model, "bnp")
        figures, drawn = prune_outliers(norms, self.scores(model, norms, data), self.u,
                                        "upper")
        # scores.png: the histogram of every channel's KL, standardised in its layer (the
        # pruned ones lie right of u); kl_standardised.png: the same per channel, in order.
        return Repaired(model=model, figures={**figures, "u": self.u},
                        artifacts={"scores": drawn, "kl_standardised": drawn.clone()})
