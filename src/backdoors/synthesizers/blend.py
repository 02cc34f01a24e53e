"""Blended trigger: the whole image is mixed with a fixed pattern."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer
from backdoors.synthesizers.images import TriggerImage


@SYNTHESIZERS.register("blend")
class BlendSynthesizer(Synthesizer):
    """Blended trigger: x' = (1 - alpha) x + alpha * pattern (Chen et al., arXiv 1712.05526).

    Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning":
    the blended injection strategy.

    `alpha` default 0.2 (the paper trains with 0.2 and finds 0.1-0.2 hard to see); the
    pattern is uniform random noise of the image size drawn from `seed` (default 0, the
    paper's "random pattern"), or the picture at `image` (a file path, e.g. the paper's
    Hello Kitty), resized to the input size and converted to the task's channels. An image
    with transparency blends only where it is opaque: x' = x + alpha * a * (pattern - x).
    """

    def __init__(
        self, alpha: float = 0.2, image: str | None = None, seed: int = 0, **base: Any
    ) -> None:
        super().__init__(**base)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha, self.image_path, self.seed = alpha, image, seed
        # Read now so that a missing file fails at config validation, not after data loads.
        self.picture = None if image is None else TriggerImage.read(image)
        self.pattern = torch.empty(0)
        self.mask = torch.empty(0)

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        c, h, w = self.input_shape
        if self.picture is None:
            generator = torch.Generator().manual_seed(self.seed)
            self.pattern = torch.rand((c, h, w), generator=generator)
            self.mask = torch.ones(1, h, w)
        else:
            self.pattern = self.picture.image(c, (h, w))
            self.mask = self.picture.mask((h, w))

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        assert self.pattern.numel(), "bind() the synthesizer to a task first"
        weight = (self.alpha * self.mask).to(x.device, x.dtype)
        pattern = self.pattern.to(x.device, x.dtype)
        # Clamp only guards against rounding: a convex mix of [0, 1] values stays in [0, 1].
        return ((1 - weight) * x + weight * pattern).clamp(0, 1)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"pattern": self.pattern, "mask": self.mask}

    def spec(self) -> dict:
        return {**super().spec(), "alpha": self.alpha, "image": self.image_path, "seed": self.seed}
