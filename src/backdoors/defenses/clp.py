"""Channel Lipschitzness-based Pruning: prune the channels with an outlying Lipschitz bound."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.channels import (
    conv_norm_pairs,
    outliers,
    pruning_figures,
    standardised,
)
from backdoors.defenses.results import Repaired


def channel_lipschitz(weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """Upper bound of each output channel's Lipschitz constant (UCLC) of a conv layer:
    the spectral norm (largest singular value) of the channel's kernel reshaped to
    [C_in, kh * kw], times |scale| of the channel where an affine map follows (a batch
    norm's gamma / sqrt(var + eps)). `weight` is [C_out, C_in, kh, kw]; returns [C_out]."""
    norms = torch.linalg.matrix_norm(weight.detach().double().flatten(2), ord=2)
    if scale is not None:
        norms = norms * scale.detach().double().abs()
    return norms


def norm_scale(norm: nn.BatchNorm2d) -> Tensor:
    """The per-channel factor an eval-mode batch norm multiplies its input by."""
    gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    return gamma / (norm.running_var + norm.eps).sqrt()


@torch.no_grad()
def zero_channels(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, pruned: Tensor) -> None:
    """Make the `pruned` output channels of conv (-> norm) output 0 everywhere: the filter
    and its bias, and the BN's scale and shift (the paper's code zeroes those two). Both,
    because in a pre-activation ResNet the stem conv's output also feeds the identity
    shortcut, which the BN does not see."""
    conv.weight[pruned] = 0.0
    if conv.bias is not None:
        conv.bias[pruned] = 0.0
    if norm is not None and norm.affine:
        norm.weight[pruned] = 0.0
        norm.bias[pruned] = 0.0


@DEFENSES.register("clp")
class CLP(ModelRepair):
    """Channel Lipschitzness-based Pruning (arXiv 2208.03111), data-free.

    Zheng, Tang, Li, Liu, "Data-free Backdoor Removal based on Channel Lipschitzness",
    ECCV 2022.

    A backdoor's trigger is a small input pattern that flips the output, so the channels
    that carry it are unusually sensitive to their input: they have a large Lipschitz
    constant. Its upper bound (UCLC) for output channel k of a conv layer is the spectral
    norm of the channel's kernel W_k, reshaped to [C_in, kh * kw], with the batch norm
    that normalises the conv's output folded in (times |gamma_k / sqrt(var_k + eps)|;
    `channel_lipschitz`). In each conv layer, the channels whose UCLC exceeds
    mean + `u` x std of the layer's UCLCs are pruned: their filter, bias, BN scale and
    shift are zeroed, so they output 0 (the paper's code zeroes the BN's scale and
    shift; the filter too here, see `zero_channels`). No data at all is used
    (`uses_clean_data = False`): only the weights.

    `u` (default 3): the threshold of the paper and its code (which the abstract calls
    robust to the choice); a smaller u prunes more channels.

    Which BN belongs to a conv is found by a dry run (`channels.conv_norm_pairs`): the BN
    that receives exactly the conv's output, where the paper's code pairs each BN with the
    last conv before it in module order (wrong where a sum sits between them, which its
    README warns about for PreAct-ResNet). A conv without such a BN (every conv of
    simple_net) is bounded by its kernel alone; its bias does not change the constant.

    Figures: `scores.png` (histogram of the per-channel UCLC, standardised within each
    layer) and `uclc_standardised.png` (the same per channel, layer after layer).
    """

    uses_clean_data = False

    def __init__(self, u: float = 3.0, **base: Any) -> None:
        super().__init__(**base)
        if u < 0:
            raise ValueError(f"u must be >= 0 (prune channels above mean + u * std), got {u}")
        self.u = u

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        model = copy.deepcopy(model).eval()
        pairs = conv_norm_pairs(model, data.input_shape)
        pruned, drawn = [], []
        for _, conv, norm in data.progress.phase(pairs, "bounding channel Lipschitz constants"):
            uclc = channel_lipschitz(conv.weight, None if norm is None else norm_scale(norm))
            flags = outliers(uclc, self.u)
            zero_channels(conv, norm, flags.to(conv.weight.device))
            pruned.append(flags)
            drawn.append(standardised(uclc))
        figures = pruning_figures([name for name, _, _ in pairs], pruned)
        figures.update(batch_norm_folded=sum(norm is not None for _, _, norm in pairs),
                       u=self.u)
        # scores.png: histogram of every channel's UCLC standardised in its layer (the
        # pruned ones lie right of u); uclc_standardised.png: the same per channel.
        drawn_all = torch.cat(drawn).float()
        return Repaired(model=model, figures=figures,
                        artifacts={"scores": drawn_all, "uclc_standardised": drawn_all.clone()})
