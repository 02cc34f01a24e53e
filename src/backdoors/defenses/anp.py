"""Adversarial Neuron Pruning: prune the neurons whose perturbation breaks the model."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.loader import Loader
from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.layers import neuron_layers, output_shapes
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import accuracy, unscaled_precision
from backdoors.execution import Accelerated, LossScaler

Granularity = Literal["unit", "channel"]


def neuron_shape(output_shape: tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
    """Shape of one sample's neurons in a layer output of `output_shape` (batch dim
    excluded), broadcastable against it: a Linear's units; a conv's channels ([C, 1, 1])
    or, for `unit`, every channel at every position ([C, H, W])."""
    if len(output_shape) == 1 or granularity == "unit":
        return output_shape
    return (output_shape[0],) + (1,) * (len(output_shape) - 1)


def _bias(module: nn.Module, like: Tensor) -> Tensor | None:
    """The layer's bias, shaped to broadcast against a mask shaped like `like`."""
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.view(-1, *([1] * (like.dim() - 1)))


class NeuronPerturbation:
    """A mask m and multiplicative perturbations (delta, xi) for every neuron of `layers`.

    A forward hook rewrites each layer's output y = Wx + b into
    (m + delta) * Wx + (1 + xi) * b per neuron: the paper's perturbation of a neuron's
    weight and bias, applied to conv and hidden linear layers instead of BN layers so that
    models without BN (simple_net) have neurons too. `perturbed` switches delta and xi on
    and off; m is always applied.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], shapes: list[tuple[int, ...]]
                 ) -> None:
        self.names = [name for name, _ in layers]
        self.modules = [module for _, module in layers]
        device = self.modules[0].weight.device
        self.masks = [torch.ones(s, device=device, requires_grad=True) for s in shapes]
        self.weight_noise = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
        self.bias_noise = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
        self.perturbed = False

    @property
    def noise(self) -> list[Tensor]:
        return self.weight_noise + self.bias_noise

    def _hook(self, index: int):  # noqa: ANN202 - a forward hook
        def rewrite(module: nn.Module, _inputs: object, out: Tensor) -> Tensor:
            scale = self.masks[index]
            if self.perturbed:
                scale = scale + self.weight_noise[index]
            bias = _bias(module, scale)
            if bias is None:
                return out * scale
            bias_scale = 1 + self.bias_noise[index] if self.perturbed else 1.0
            return (out - bias) * scale + bias * bias_scale
        return rewrite

    @contextmanager
    def applied(self) -> Iterator[NeuronPerturbation]:
        handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def randomize(self, eps: float, generator: torch.Generator) -> None:
        """Draw delta and xi uniformly from [-eps, eps] (the paper's random start)."""
        with torch.no_grad():
            for t in self.noise:
                t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1).mul_(eps))


class PrunedLayer(nn.Module):
    """`layer` with some neurons pruned: their weighted input is dropped and they output
    only their bias, as the paper's pruning zeroes a BN neuron's scale and keeps its
    shift. `keep` is a 0/1 buffer shaped like the layer's neurons (see `neuron_shape`)."""

    def __init__(self, layer: nn.Module, keep: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("keep", keep.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        bias = _bias(self.layer, self.keep)
        if bias is None:
            return out * self.keep
        return (out - bias) * self.keep + bias


def prune_neurons(model: nn.Module, names: list[str], pruned: list[Tensor]) -> nn.Module:
    """Wrap each named layer of `model` (in place) in a PrunedLayer dropping the neurons
    marked True in the matching `pruned`; layers with nothing pruned stay as they are."""
    for name, mask in zip(names, pruned, strict=True):
        if not bool(mask.any()):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        keep = (~mask).to(next(layer.parameters()).device)
        setattr(parent, child, PrunedLayer(layer, keep))
    return model


@DEFENSES.register("anp")
class ANP(ModelRepair):
    """Adversarial Neuron Pruning (arXiv 2110.14430).

    Wu, Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models" (NeurIPS 2021).

    Each neuron gets a mask m in [0, 1] and multiplicative perturbations of its weight and
    bias bounded by `eps` (`NeuronPerturbation`). On each clean-budget batch the
    perturbations take one signed gradient-ascent step of size eps on the loss from a
    random start in the eps-box, then the masks one SGD step on `alpha` x (loss with masks
    only) + (1 - `alpha`) x (loss with masks and perturbations): neurons whose perturbation
    hurts most (the backdoor's are the sensitive ones) get small masks. After `iterations`
    steps the neurons with mask below `threshold` are pruned, or, when `fraction` is set,
    that share of neurons with the smallest masks.

    Neurons live in every Conv2d and every hidden Linear (`layers.neuron_layers`) rather
    than in the paper's BN layers, so BN-free models have them too: a Linear's units, and
    a conv's output channels (`granularity: channel`, the paper's neuron) or each channel
    at each position (`unit`, the default). The model stays in eval mode (BN uses its
    running statistics), so scaling a neuron really scales what the next layer sees.

    Defaults are the paper's (`eps` 0.4, `alpha` 0.2, mask SGD `lr` 0.2 with momentum 0.9,
    `iterations` 2000, `batch_size` 128) but for two that fail on MNIST with simple_net.
    Channels: the pattern's channels are also the digits' stroke detectors; their masks
    fall in the first iterations, then recover, and pruning below 0.2 after 1,000
    iterations leaves 98% ASR. Units work (with 2,000 iterations, 1.7-2.3% ASR): those at
    the trigger's corner see only blank background on clean digits. `threshold` 0.5: at the
    paper's 0.2, 2,000 iterations leave the blind attack 33% ASR (0.5: 1.7%, clean
    accuracy unchanged).

    Precision: forward passes run in the run's precision and the mask step uses the loss
    scaler under fp16. The perturbation's signed step takes its gradient unscaled, so
    under fp16 its forward runs in fp32 (`unscaled_precision`).
    """

    def __init__(
        self,
        eps: float = 0.4,
        alpha: float = 0.2,
        threshold: float = 0.5,
        fraction: float | None = None,
        granularity: Granularity = "unit",
        iterations: int = 2000,
        lr: float = 0.2,
        batch_size: int = 128,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if eps < 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"eps must be >= 0 and alpha in [0, 1], got eps={eps}, "
                             f"alpha={alpha}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1) (or null: use threshold), got "
                             f"{fraction}")
        if granularity not in ("unit", "channel"):
            raise ValueError(f"granularity must be 'unit' or 'channel', got {granularity!r}")
        if iterations < 0 or lr <= 0 or batch_size < 1:
            raise ValueError("iterations must be >= 0, lr > 0 and batch_size >= 1")
        self.eps, self.alpha, self.threshold, self.fraction = eps, alpha, threshold, fraction
        self.granularity, self.iterations, self.lr = granularity, iterations, lr
        self.batch_size = batch_size

    def neurons(self, model: nn.Module, input_shape: tuple[int, ...]) -> NeuronPerturbation:
        """Masks (all 1) and perturbations (all 0) for the neurons of `model`."""
        layers = neuron_layers(model)
        shapes = output_shapes(model, [m for _, m in layers], input_shape)
        return NeuronPerturbation(layers, [neuron_shape(s, self.granularity) for s in shapes])

    def optimize_masks(self, model: nn.Module, data: DefenseData) -> NeuronPerturbation:
        """The trained masks of the neurons of a copy of `model` (the model is not changed;
        the masks' `names` address the same layers in it)."""
        model = copy.deepcopy(model).eval().requires_grad_(False)
        neurons = self.neurons(model, data.input_shape)
        mask_opt = torch.optim.SGD(neurons.masks, lr=self.lr, momentum=0.9)
        # One signed ascent step of size eps from a random start in the eps-box (the
        # paper's code), then back into the box.
        noise_opt = torch.optim.SGD(neurons.noise, lr=self.eps)
        forward = Accelerated(model, data.device, data.precision)
        probe = Accelerated(model, data.device, unscaled_precision(data.precision))
        scaler = LossScaler(data.precision, data.device)
        batches = _cycle(data, self.batch_size)
        with neurons.applied():
            for _ in data.progress.phase(range(self.iterations),
                                         "optimising neuron masks under perturbation"):
                x, y = next(batches)
                loss_rob = torch.zeros((), device=x.device)
                if self.eps > 0:
                    neurons.randomize(self.eps, data.generator)
                    neurons.perturbed = True
                    noise_opt.zero_grad()
                    (-F.cross_entropy(probe(x), y)).backward()
                    for t in neurons.noise:
                        if t.grad is not None:  # None: the bias noise of a bias-free layer
                            t.grad.sign_()
                    noise_opt.step()
                    with torch.no_grad():
                        for t in neurons.noise:
                            t.clamp_(-self.eps, self.eps)
                    loss_rob = F.cross_entropy(forward(x), y)
                neurons.perturbed = False
                loss_nat = F.cross_entropy(forward(x), y)
                mask_opt.zero_grad()
                scaler.backward(self.alpha * loss_nat + (1 - self.alpha) * loss_rob)
                scaler.step(mask_opt)
                with torch.no_grad():
                    for m in neurons.masks:
                        m.clamp_(0.0, 1.0)
        return neurons

    def pruned(self, masks: list[Tensor]) -> list[Tensor]:
        """Boolean per neuron (shaped like each mask): pruned or not, by threshold or by
        fraction."""
        flat = torch.cat([m.detach().flatten().cpu() for m in masks])
        if self.fraction is None:
            chosen = flat < self.threshold
        else:
            chosen = torch.zeros(len(flat), dtype=torch.bool)
            chosen[flat.argsort()[: int(self.fraction * len(flat))]] = True
        parts = chosen.split([m.numel() for m in masks])
        return [p.view(m.shape) for p, m in zip(parts, masks, strict=True)]

    def restore(self, model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
        """Re-wrap the pruned layers (each saved with a `keep` buffer), then load."""
        names = [k.removesuffix(".keep") for k in state if k.endswith(".keep")]
        prune_neurons(model, names, [state[f"{n}.keep"] == 0 for n in names])
        return super().restore(model, state)

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        neurons = self.optimize_masks(model, data)
        pruned = self.pruned(neurons.masks)
        repaired = prune_neurons(copy.deepcopy(model), neurons.names, pruned).eval()
        per_layer = {n: int(p.sum()) for n, p in zip(neurons.names, pruned, strict=True)}
        count, total = sum(per_layer.values()), sum(p.numel() for p in pruned)
        return Repaired(model=repaired, figures={
            "pruned_neurons": count,
            "pruned_ratio": count / max(total, 1),
            "pruned_per_layer": per_layer,
            "clean_budget_accuracy_after": accuracy(repaired, data.clean, data),
        })


def _cycle(data: DefenseData, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled clean-budget batches, epoch after epoch."""
    loader = Loader(data.clean, batch_size, data.device, shuffle=True, generator=data.generator)
    while True:
        for batch in loader:
            yield batch.inputs, batch.labels
