"""Entropy-based Pruning: prune the neurons whose pre-activation distribution on the
training set is a mixture (low differential entropy for its variance)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.channels import channel_layers, prune_outliers, reduce_pre_activations
from backdoors.defenses.results import Repaired


def histogram_entropy(values: Tensor, bin_width: float) -> Tensor:
    """Differential entropy (nats) of each row of `values` [C, N], estimated by a
    histogram: bins `bin_width` wide from the row's minimum, H = -sum p log p + log
    bin_width (the plug-in estimate; the paper's code leaves out the constant log term,
    which no threshold relative to the layer sees)."""
    values = values.double()
    rows, n = values.shape
    index = ((values - values.min(1, keepdim=True).values) / bin_width).floor().long()
    counts = torch.zeros(rows, int(index.max()) + 1 if index.numel() else 1,
                         dtype=torch.float64)
    counts.scatter_add_(1, index, torch.ones_like(values))
    p = counts / n
    return -torch.xlogy(p, p).sum(1) + math.log(bin_width)


def standardise_rows(values: Tensor) -> Tensor:
    """Each row of [C, N] to mean 0 and unbiased std 1; a constant row becomes NaN (it has
    no distribution to judge)."""
    values = values.double()
    std = values.std(1, keepdim=True)
    out = (values - values.mean(1, keepdim=True)) / std
    return torch.where(std > 0, out, torch.full_like(out, float("nan")))


def spatial_max(x: Tensor) -> Tensor:
    """[N, C]: each channel's largest pre-activation over positions, per sample."""
    return x.detach().flatten(2).amax(2)


@DEFENSES.register("ep")
class EP(ModelRepair):
    """Entropy-based Pruning (EP), NeurIPS 2022 (OpenReview wwW-1k1ljIg).

    Zheng, Tang, Li, Liu, "Pre-activation Distributions Expose Backdoor Neurons",
    NeurIPS 2022 (no arXiv version; openreview.net/forum?id=wwW-1k1ljIg).

    The paper's first setting: the defender holds the (poisoned) training set the model
    was trained on, but not which samples are poisoned. On it, a backdoor neuron's
    pre-activation is a mixture of two populations (benign and poisoned) with very
    different moments; a Gaussian has the largest differential entropy of all
    distributions with a given variance, and a well-separated mixture much less. So for
    every channel of every BatchNorm2d, the training set's pre-activations (the BN's
    input, reduced to each sample's maximum over positions, model in eval mode) are
    standardised, and their differential entropy estimated with a histogram of bins
    `bin_width` standard deviations wide (`histogram_entropy`). Channels whose entropy lies
    below mean - `u` x std of their layer's entropies are pruned: their BN scale is zeroed,
    as in the paper's code. Uses the training set as the victim received it
    (`uses_training_set`), and no clean data (`uses_clean_data = False`).

    `u` (default 3): the paper's code's default, also BackdoorBench's. `bin_width`
    (default 0.01): the paper's code's histogram step on the standardised values.

    Deviations: the paper's code scores one batch of the training set (its comment
    recommends the whole set for better results); here the whole training set, batched.
    A channel constant over the training set has no distribution to judge and is never
    pruned. A model without batch norm (simple_net) has no BN input to read; its conv
    outputs are the same quantity (the pre-activation before the ReLU), so there each
    conv's output channels are scored and a pruned channel's filter is zeroed (it outputs
    its bias), as RNP does (`channels.channel_layers`).

    Figures: `scores.png` (histogram of minus the standardised entropy: the pruned
    channels lie right of u) and `entropy_standardised.png` (per channel, in order).
    """

    uses_training_set = True
    uses_clean_data = False

    def __init__(self, u: float = 3.0, bin_width: float = 0.01, **base: Any) -> None:
        super().__init__(**base)
        if u < 0:
            raise ValueError(f"u must be >= 0 (prune channels below mean - u * std), got {u}")
        if bin_width <= 0:
            raise ValueError(f"bin_width must be > 0, got {bin_width}")
        self.u, self.bin_width = u, bin_width

    def scores(self, model: nn.Module, layers: list[tuple[str, nn.Module]],
               data: DefenseData) -> list[Tensor]:
        """Differential entropy per channel of each layer (NaN: constant channel)."""
        if data.train is None or len(data.train) < 2:
            raise ValueError("ep needs the training set (at least 2 samples)")
        maxima = reduce_pre_activations(model, [m for _, m in layers], data.train, data,
                                        spatial_max, "training-set pre-activations")
        out = []
        for batches in maxima:
            z = standardise_rows(torch.cat(batches).T)
            constant = z.isnan().any(1)
            entropy = histogram_entropy(z.nan_to_num(0.0), self.bin_width)
            out.append(torch.where(constant, torch.full_like(entropy, float("nan")), entropy))
        return out

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        model = copy.deepcopy(model).eval()
        layers = channel_layers(model)
        figures, drawn = prune_outliers(layers, self.scores(model, layers, data), self.u,
                                        "lower")
        # Suspicion rises as entropy falls: scores.png shows minus the standardised
        # entropy, so the pruned channels lie right of u as for BNP and CLP.
        return Repaired(model=model, figures={**figures, "u": self.u}, artifacts={
            "scores": -drawn, "entropy_standardised": drawn})
