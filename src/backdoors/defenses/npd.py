"""Neural Polarizer Defense: a learned linear layer inserted into the backdoored model
filters trigger features out of its intermediate representation."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.loader import Loader
from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.layers import neuron_layers
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import accuracy, unscaled_precision
from backdoors.errors import ConfigError, did_you_mean
from backdoors.execution import Accelerated, LossScaler


class Polarizer(nn.Module):
    """The neural polarizer: a 1x1 convolution with bias (C -> C), i.e. one affine map of
    the channels at every position (a [N, C] input is treated as 1 x 1 maps). It starts
    as the identity, so the polarized model starts as the backdoored one."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels)[:, :, None, None])
            self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return self.conv(x[:, :, None, None])[:, :, 0, 0]
        return self.conv(x)


class Polarized(nn.Module):
    """`layer` reading its input through a polarizer."""

    def __init__(self, layer: nn.Module, polarizer: Polarizer) -> None:
        super().__init__()
        self.polarizer = polarizer
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.polarizer(x))


def insert_polarizer(model: nn.Module, name: str, channels: int) -> Polarizer:
    """Wrap the module `name` of `model` (in place) in a `Polarized` with a fresh
    polarizer of `channels` and return the polarizer. A model repaired by NPD is the
    architecture with this one change: building it and calling this with the
    `polarizer_layer` and `polarizer_channels` of the result restores its state dict."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    layer = getattr(parent, child)
    polarizer = Polarizer(channels).to(next(model.parameters()).device)
    setattr(parent, child, Polarized(layer, polarizer))
    return polarizer


def default_layer(model: nn.Module) -> str:
    """The model's last layer with weights before the head (its last Conv2d or hidden
    Linear, `layers.neuron_layers`): a deep layer, as the paper's choice (the first conv
    of PreAct-ResNet-18's last block), found for any model."""
    layers = neuron_layers(model)
    if not layers:
        raise ConfigError("defense 'npd': the model has no Conv2d or hidden Linear; name "
                          "the layer whose input is polarized with `layer`")
    return layers[-1][0]


def targeted_labels(logits: Tensor, labels: Tensor) -> Tensor:
    """The most likely class other than the label: the paper's estimate of where a
    backdoor would send the input."""
    return logits.scatter(1, labels[:, None], float("-inf")).argmax(1)


def project_l2(delta: Tensor, radius: float) -> Tensor:
    """Each row of `delta` scaled into the L2 ball of `radius` (unchanged if inside)."""
    norms = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
    return delta * (radius / norms).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))


def polarizer_loss(clean_logits: Tensor, adv_logits: Tensor, labels: Tensor,
                   clean_pred: Tensor, targets: Tensor, lmd: tuple[float, ...]) -> Tensor:
    """The outer objective of the official code, weights `lmd` = (λ1, λ2, λ3, λ4):
    λ1 CE(clean, label) + λ2 CE(adversarial, clean prediction) + λ3 x mean -log(1 - p) of
    the adversarial input's most likely wrong class + λ4 x mean -log(1 - p) of its
    targeted class (-log(1.0001 - p): finite at p = 1)."""
    probs = adv_logits.softmax(1)
    top2 = probs.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])

    def push_off(classes: Tensor) -> Tensor:
        return -torch.log(1.0001 - probs.gather(1, classes[:, None]).squeeze(1)).mean()

    return (lmd[0] * F.cross_entropy(clean_logits, labels)
            + lmd[1] * F.cross_entropy(adv_logits, clean_pred)
            + lmd[2] * push_off(wrong) + lmd[3] * push_off(targets))


def targeted_perturbation(model: nn.Module, x: Tensor, targets: Tensor, radius: float,
                          step: float, steps: int, stop_at: float = 0.6) -> Tensor:
    """Per-input perturbations in the L2 ball of `radius` that send the (polarized) model
    to `targets`: signed-gradient descent steps of size `step` on the cross-entropy
    towards them (clamped at 80, as the official code), from δ = 0, stopping once more
    than `stop_at` of the batch reaches its target. Images stay in [0, 1]."""
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), targets,
                               reduction="none").clamp(max=80.0).mean()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project_l2(delta.detach() - step * grad.sign(), radius)
        with torch.no_grad():
            hit = (model((x + delta).clamp(0, 1)).argmax(1) == targets).float().mean()
        if float(hit) > stop_at:
            break
    return delta.detach()


@DEFENSES.register("npd")
class NPD(ModelRepair):
    """Neural Polarizer Defense (arXiv 2306.16697).

    Zhu, Wei, Zha, Wu, "Neural Polarizer: A Lightweight and Effective Backdoor Defense via
    Purifying Poisoned Features" (NeurIPS 2023).

    A learnable linear layer, the polarizer (`Polarizer`: a 1x1 convolution with bias,
    starting as the identity), is inserted in front of `layer` and trained, with the rest
    of the model frozen, on the clean budget so that it passes benign features and filters
    trigger features. Bi-level, per mini-batch: (inner) targeted adversarial examples of
    the polarized model in the L2 ball of radius `trigger_norm`, aimed at each input's
    most likely wrong class (the estimated target; `inner_steps` signed steps of `adv_lr`,
    stopping early when more than 60% hit); (outer) one SGD step of the polarizer on
    `polarizer_loss` with weights (`lmd1`, `lmd2`, `lmd3`, `lmd4`): keep clean accuracy,
    make the adversarial input's prediction that of the clean one, and push it off its
    most likely wrong class and off its targeted class.

    The repaired model is the original with the polarizer inserted: `body`, `pool` and
    `head` are where they were, so `feature_map`, `features` and `head` work as before,
    and `insert_polarizer` rebuilds its structure to load its saved state.

    Defaults are the official code's (BackdoorBench `defense/npd.py` and its CIFAR-10
    config, by the paper's authors): `epochs` 50, SGD `lr` 0.01 (momentum 0.9, weight
    decay 5e-4) annealed by a cosine over the epochs, `batch_size` 128, L2 `trigger_norm` 3.0,
    `adv_lr` 0.1, `inner_steps` 2, `lmd1` 1, `lmd2` `lmd3` `lmd4` 0.4. `layer`: the module
    whose input is polarized; null picks the model's last layer with weights before the
    head (`default_layer`: `pool.1`, the hidden Linear, on simple_net; the last block's
    second conv on the ResNets, where the official choice for PreAct-ResNet-18 is
    `body.layer4.1.conv1`, the same block's first conv). Deviation: the official default
    polarizer (`convbn`) is a 1x1 convolution and a batch norm kept in eval mode, whose
    statistics a 5-epoch warm-up (lr 1e-4, train mode) sets; in eval mode that is the
    same affine map as a 1x1 convolution with bias, used here from the identity without
    warm-up. Batch statistics would divide near-constant channels by their tiny
    deviation: calibrated on the clean budget, the 512 inputs of tiny_cnn's hidden layer
    diverged (clean accuracy 10% on the digits task). Uses only the clean budget.

    Precision: the polarized model's forward passes run in the run's precision and the
    polarizer's step uses the loss scaler under fp16. The targeted perturbation takes
    input gradients unscaled, so under fp16 it runs in fp32 (`unscaled_precision`).
    """

    def __init__(
        self,
        layer: str | None = None,
        epochs: int = 50,
        lr: float = 0.01,
        batch_size: int = 128,
        trigger_norm: float = 3.0,
        adv_lr: float = 0.1,
        inner_steps: int = 2,
        lmd1: float = 1.0,
        lmd2: float = 0.4,
        lmd3: float = 0.4,
        lmd4: float = 0.4,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if epochs < 0 or lr <= 0 or batch_size < 1 or inner_steps < 0:
            raise ValueError("epochs and inner_steps must be >= 0, lr > 0, batch_size >= 1")
        if trigger_norm <= 0 or adv_lr <= 0:
            raise ValueError(f"trigger_norm and adv_lr must be > 0, got "
                             f"trigger_norm={trigger_norm}, adv_lr={adv_lr}")
        if min(lmd1, lmd2, lmd3, lmd4) < 0:
            raise ValueError("lmd1, lmd2, lmd3 and lmd4 must be >= 0")
        if layer is not None and not layer:
            raise ValueError("layer must name a module (or be null: the last Conv2d)")
        self.layer, self.epochs, self.lr, self.batch_size = layer, epochs, lr, batch_size
        self.trigger_norm, self.adv_lr, self.inner_steps = trigger_norm, adv_lr, inner_steps
        self.lmd = (lmd1, lmd2, lmd3, lmd4)

    def polarize(self, model: nn.Module, data: DefenseData) -> tuple[str, Polarizer]:
        """Insert an identity polarizer in front of `layer` of `model` (in place); the
        number of channels comes from one dry run on a clean-budget batch."""
        name = self.layer or default_layer(model)
        modules = dict(model.named_modules())
        if name not in modules or not name:
            raise ConfigError(f"defense 'npd': layer names '{name}', which the model does "
                              f"not have{did_you_mean(name, modules)}")
        shapes: list[torch.Size] = []
        hook = modules[name].register_forward_pre_hook(lambda m, i: shapes.append(i[0].shape))
        try:
            with torch.no_grad():
                model(next(iter(data.loader(data.clean))).inputs)
        finally:
            hook.remove()
        if len(shapes[0]) not in (2, 4):
            raise ConfigError(f"defense 'npd': the input of '{name}' has shape "
                              f"{tuple(shapes[0][1:])}; a polarizer needs [C] or [C, H, W]")
        return name, insert_polarizer(model, name, shapes[0][1])

    def restore(self, model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
        """Re-insert the polarizer (found in `state` by its `.polarizer.conv.weight`, which
        also gives its channels) in front of its layer, then load."""
        suffix = ".polarizer.conv.weight"
        for key in [k for k in state if k.endswith(suffix)]:
            insert_polarizer(model, key.removesuffix(suffix), state[key].shape[0])
        return super().restore(model, state)

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor,
                   probe: nn.Module | None = None) -> tuple[Tensor, float]:
        """The loss of one batch (graph kept for the polarizer) and the share of its
        targeted adversarial examples that hit. `model` is the polarized model's forward;
        `probe` (default: `model`) the one the perturbation search differentiates."""
        with torch.no_grad():
            logits = model(x)
        clean_pred, targets = logits.argmax(1), targeted_labels(logits, y)
        delta = targeted_perturbation(model if probe is None else probe, x, targets,
                                      self.trigger_norm, self.adv_lr, self.inner_steps)
        adv = (x + delta).clamp(0, 1)
        clean_logits, adv_logits = model(torch.cat([x, adv])).split(len(x))
        hit = float((adv_logits.argmax(1) == targets).float().mean())
        return polarizer_loss(clean_logits, adv_logits, y, clean_pred, targets, self.lmd), hit

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        model = copy.deepcopy(model).eval()
        flags = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        name, polarizer = self.polarize(model, data)
        optimizer = torch.optim.SGD(polarizer.parameters(), lr=self.lr, momentum=0.9,
                                    weight_decay=5e-4)
        loader = Loader(data.clean, self.batch_size, data.device, shuffle=True,
                        generator=data.generator)
        # The official config anneals the learning rate by a cosine over the epochs.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, self.epochs))
        forward = Accelerated(model, data.device, data.precision)
        probe = Accelerated(model, data.device, unscaled_precision(data.precision))
        scaler = LossScaler(data.precision, data.device)
        hits = []
        for _ in data.progress.phase(range(self.epochs), "training the polarizer"):
            rates = []
            for batch in loader:
                loss, hit = self.train_step(forward, batch.inputs, batch.labels, probe)
                optimizer.zero_grad(set_to_none=True)
                scaler.backward(loss)
                scaler.step(optimizer)
                rates.append(hit)
            schedule.step()
            hits.append(sum(rates) / max(len(rates), 1))
        originals = [p for n, p in model.named_parameters() if ".polarizer." not in f".{n}"]
        for p, flag in zip(originals, flags, strict=True):
            p.requires_grad_(flag)
        weight = polarizer.conv.weight.detach().flatten(1).cpu()
        artifacts = {"polarizer_matrix": weight[None, None]}
        if hits:
            artifacts["targeted_hit_rate_curve"] = torch.tensor(hits)
        return Repaired(model=model.eval(), figures={
            "polarizer_layer": name, "polarizer_channels": int(weight.shape[0]),
            "polarizer_parameters": sum(p.numel() for p in polarizer.parameters()),
            "clean_budget_accuracy_after": accuracy(model, data.clean, data),
        }, artifacts=artifacts)
