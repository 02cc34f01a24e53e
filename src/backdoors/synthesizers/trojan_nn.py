"""TrojanNN: a square trigger optimised to drive strongly connected internal neurons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.data.dataset import Dataset
from backdoors.synthesizers.base import SYNTHESIZERS
from backdoors.synthesizers.surrogate import OptimisedSynthesizer, in_memory, resolve


def incoming_weights(model: nn.Module) -> Tensor:
    """The weights that feed the model's penultimate features (`features(x)`), one row
    per feature: the last Linear of `model.pool` producing them, or else the last Conv2d
    of `model.body` (models whose pool is a global average)."""
    width = model.head.in_features
    for layer in reversed(list(model.pool.modules())):
        if isinstance(layer, nn.Linear) and layer.out_features == width:
            return layer.weight
    for layer in reversed(list(model.body.modules())):
        if isinstance(layer, nn.Conv2d) and layer.out_channels == width:
            return layer.weight
    raise ValueError(f"cannot find the layer feeding {type(model).__name__}'s features")


def most_connected(model: nn.Module, k: int) -> Tensor:
    """Indices (sorted) of the k penultimate neurons with the largest total absolute
    incoming weight: TrojanNN's neuron-selection criterion."""
    strength = incoming_weights(model).detach().abs().flatten(1).sum(1)
    return strength.topk(min(k, len(strength))).indices.sort().values.cpu()


@SYNTHESIZERS.register("trojan_nn")
class TrojanNNSynthesizer(OptimisedSynthesizer):
    """TrojanNN (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018): a square
    trigger optimised to drive the most strongly connected internal neurons to a high
    value; the model is then trained on data stamped with it.

    `prepare()` trains a surrogate, picks the `num_neurons` (default 1) penultimate-layer
    neurons with the largest sum of absolute weights from the layer before (the paper's
    selection criterion), and optimises the pixels of a `size` x `size` square in the
    bottom-right corner (default: a quarter of the image side, about 6% of its area)
    to bring those neurons' activations to `target_value` (100, far above their normal
    range, so the loss keeps pushing): mean squared error, `trigger_steps` (500) Adam
    steps of `trigger_lr` (0.05), pixels kept in [0, 1]. The trigger replaces the square's
    pixels, at training and test time alike. Retraining is the data attack's job.

    Simplifications: the paper's attacker owns the victim's pre-trained model, selects
    neurons in it and retrains it on reverse-engineered data; here neurons are selected in
    a surrogate trained on the task's data, the trigger is optimised on training images
    stamped with it (the paper optimises the trigger region alone), and the victim learns
    the trigger through ordinary data poisoning. Before `prepare()` the square holds
    uniform noise (seed 0), an un-optimised trigger.
    """

    def __init__(
        self,
        size: int | None = None,
        num_neurons: int = 1,
        target_value: float = 100.0,
        trigger_steps: int = 500,
        trigger_lr: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (size is not None and size < 1) or num_neurons < 1:
            raise ValueError("need size >= 1 and num_neurons >= 1")
        if trigger_steps < 0 or trigger_lr <= 0:
            raise ValueError("need trigger_steps >= 0 and trigger_lr > 0")
        self.size, self.num_neurons, self.target_value = size, num_neurons, target_value
        self.trigger_steps, self.trigger_lr = trigger_steps, trigger_lr
        self.neurons = torch.empty(0, dtype=torch.long)
        self._place()

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        h, w = input_shape[1:]
        if self.size is not None and self.size > min(h, w):
            raise ValueError(f"a {self.size}x{self.size} trigger does not fit {h}x{w} images")
        self._place()

    def _place(self) -> None:
        """The mask (bottom-right square) and an un-optimised noise trigger inside it."""
        c, h, w = self.input_shape
        side = self.size or max(1, round(min(h, w) / 4))
        self.mask = torch.zeros(1, h, w)
        self.mask[:, h - side :, w - side :] = 1.0
        self.values = self._initial(torch.Generator().manual_seed(0))

    def _initial(self, generator: torch.Generator) -> Tensor:
        return torch.rand(self.input_shape, generator=generator) * self.mask

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        data = in_memory(train, self.name)
        model = self.fit_surrogate(data, generator)
        device = resolve(self.device)
        self.neurons = most_connected(model, self.num_neurons)
        neurons, mask = self.neurons.to(device), self.mask.to(device)
        values = self._initial(generator).to(device).requires_grad_(True)
        opt = torch.optim.Adam([values], lr=self.trigger_lr)
        for _ in range(self.trigger_steps):
            pick = torch.randint(0, len(data), (min(self.batch_size, len(data)),),
                                 generator=generator)
            x = data.images[pick].to(device).float().div(255)
            act = model.features(x * (1 - mask) + values * mask)[:, neurons]
            loss = (self.target_value - act).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                values.clamp_(0, 1)
        self.values = (values.detach() * mask).cpu()

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mask = self.mask.to(x)
        return x * (1 - mask) + self.values.to(x) * mask

    def state_tensors(self) -> dict[str, Tensor]:
        return {"trigger": self.values, "mask": self.mask, "neurons": self.neurons}

    def spec(self) -> dict:
        side = int(self.mask[0].sum(0).amax())
        return {**super().spec(), "size": side, "neurons": self.neurons.tolist()}
