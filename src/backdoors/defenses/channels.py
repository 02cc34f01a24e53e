"""Channel-level helpers shared by the pruning defenses CLP, BNP, EP and RNP.

Those defenses treat each output channel of a convolution (or each channel of a batch-norm
layer) as a neuron, score it, flag the outliers of its layer and prune them. What they
share lives here: finding batch-norm layers, the channel layers of any model and the
conv -> BN pairs (from the module tree and one dry run, like `layers.py`), the per-layer
outlier rule, and one pass over a dataset that reduces each channel's pre-activation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from backdoors.data.dataset import Dataset
from backdoors.defenses.base import DefenseData
from backdoors.errors import ConfigError

# Reduces a module's input batch [N, C, H, W] to what a defense keeps (moments, maxima).
Reduce = Callable[[Tensor], Tensor]


def outliers(values: Tensor, u: float, side: Literal["upper", "lower"] = "upper") -> Tensor:
    """Which entries of `values` (the scores of one layer's channels) lie beyond
    mean + u * std (`upper`) or below mean - u * std (`lower`), the threshold rule of CLP,
    BNP and EP. The std is the unbiased one (torch's default, as the papers' code uses);
    a layer with fewer than two channels has no outliers."""
    values = values.double()
    if len(values) < 2:
        return torch.zeros(len(values), dtype=torch.bool)
    mean, std = values.mean(), values.std()
    return values > mean + u * std if side == "upper" else values < mean - u * std


def model_name(model: nn.Module) -> str:
    return getattr(type(model), "registry_name", type(model).__name__)


def batch_norms(model: nn.Module, defense: str | None = None
                ) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d of `model` with its qualified name, in module order. With
    `defense` (its name), a model without any is refused with a ConfigError naming it (a
    user's choice of model, not a bug: one line, exit code 2)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if defense is not None and not found:
        raise ConfigError(
            f"{defense} reads the statistics stored in batch-norm layers, and model "
            f"'{model_name(model)}' has none; use a model with batch norm (e.g. tiny_cnn, "
            "resnet18, preact_resnet18, vgg11)")
    if defense is not None and any(not m.track_running_stats or not m.affine
                                   for _, m in found):
        raise ConfigError(f"{defense} needs batch-norm layers with running statistics and "
                         f"an affine scale; model '{model_name(model)}' has some without")
    return found


def channel_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose channels EP and RNP score and prune: every BatchNorm2d (the
    papers' neurons) when the model has batch norm, otherwise every Conv2d (its output
    channels; simple_net). Either way a layer's `weight` is indexed by channel first, so
    zeroing `weight[c]` leaves channel c only its shift (BN) or bias (conv)."""
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    return norms or [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def pre_activation(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """A channel layer's pre-activation: what a BN receives (the paper's choice: the
    conv's raw output, before normalisation) or what a conv returns (before its ReLU)."""
    return inputs[0] if isinstance(module, nn.BatchNorm2d) else output


def conv_norm_pairs(model: nn.Module, input_shape: tuple[int, ...]
                    ) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every Conv2d of `model` (module order) with the BatchNorm2d that normalises exactly
    its output, or None. Found with one dry run in eval mode: a BN is paired with a conv
    when the tensor it receives is the very tensor the conv returned, so a BN after a sum
    (a pre-activation block's) or a conv feeding a ReLU is left unpaired."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    norms = [m for _, m in batch_norms(model)]
    produced: dict[int, int] = {}  # id of a conv's output -> index of the conv
    keep: list[Tensor] = []  # holds the outputs so their ids stay unique during the run
    pairs: dict[int, nn.BatchNorm2d] = {}

    def conv_hook(index: int):  # noqa: ANN202 - a forward hook
        def hook(_m: nn.Module, _inputs: object, out: Tensor) -> None:
            produced[id(out)] = index
            keep.append(out)
        return hook

    def norm_hook(norm: nn.BatchNorm2d):  # noqa: ANN202 - a forward pre-hook
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            index = produced.get(id(inputs[0]))
            if index is not None:
                pairs.setdefault(index, norm)
        return hook

    handles = [m.register_forward_hook(conv_hook(i)) for i, (_, m) in enumerate(convs)]
    handles += [m.register_forward_pre_hook(norm_hook(m)) for m in norms]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [(name, conv, pairs.get(i)) for i, (name, conv) in enumerate(convs)]


@torch.no_grad()
def reduce_pre_activations(model: nn.Module, modules: list[nn.Module], dataset: Dataset,
                           data: DefenseData, reduce: Reduce, what: str
                           ) -> list[list[Tensor]]:
    """One batched pass of `model` (eval mode) over `dataset`, shown as phase `what`: for
    each of `modules`, the list of `reduce(pre-activation)` per batch, on the CPU (see
    `pre_activation`)."""
    kept: list[list[Tensor]] = [[] for _ in modules]

    def record(index: int):  # noqa: ANN202 - a forward hook
        def hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            kept[index].append(reduce(pre_activation(m, inputs, out)).cpu())
        return hook

    handles = [m.register_forward_hook(record(i)) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        for batch in data.progress.phase(data.loader(dataset), what):
            model(batch.inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return kept


def standardised(values: Tensor) -> Tensor:
    """(values - mean) / std within one layer (the unbiased std; 1 where undefined), so
    the scores of layers of different scales can be drawn together against u."""
    values = values.double()
    if len(values) < 2:
        return torch.zeros_like(values)
    return (values - values.mean()) / values.std().clamp(min=1e-12)


def pruning_figures(names: list[str], pruned: list[Tensor]) -> dict[str, Any]:
    """How many channels were pruned, their share of all channels scored, and the count
    per layer (layers with none left out)."""
    count, total = sum(int(p.sum()) for p in pruned), sum(p.numel() for p in pruned)
    return {"pruned_channels": count, "pruned_ratio": count / max(total, 1),
            "pruned_per_layer": {n: int(p.sum()) for n, p in zip(names, pruned, strict=True)
                                 if bool(p.any())}}


@torch.no_grad()
def prune_outliers(layers: list[tuple[str, nn.Module]], scores: list[Tensor], u: float,
                   side: Literal["upper", "lower"]) -> tuple[dict[str, Any], Tensor]:
    """Zero the `weight` of the channels whose score is an outlier of its layer
    (`outliers`), in place: a BN channel then outputs its shift beta whatever its input
    (the pruning of BNP's and EP's code), a conv channel its bias. A NaN score (a channel
    that could not be scored) is never pruned and left out of its layer's mean and std.
    Returns the pruning figures and every layer's standardised scores, concatenated (NaN
    where unscored)."""
    pruned, drawn = [], []
    for (_, layer), score in zip(layers, scores, strict=True):
        valid = ~score.isnan()
        flags = torch.zeros(len(score), dtype=torch.bool)
        flags[valid] = outliers(score[valid], u, side)
        layer.weight[flags.to(layer.weight.device)] = 0.0
        pruned.append(flags)
        z = torch.full((len(score),), float("nan"), dtype=torch.float64)
        z[valid] = standardised(score[valid])
        drawn.append(z)
    return pruning_figures([n for n, _ in layers], pruned), torch.cat(drawn).float()
