"""A trigger split into local parts, for distributed backdoor attacks (DBA).

DBA ("DBA: Distributed Backdoor Attacks against Federated Learning", Xie et al., ICLR
2020) decomposes the global trigger into local triggers, one per colluding client. Here
the split works for any synthesizer: the trigger's region is the bounding box of the
pixels it changes, found on a probe batch (all-black, all-white and random images, so a
mask-based trigger's mask shows whatever its pattern is); the box is cut into a grid and
part i keeps the global trigger's change only inside piece i. The pieces tile the box, so
for a trigger that changes pixels independently (patterns, blends) applying every part
in turn gives exactly the global trigger.

Grid: 4 parts are 2 x 2 (as in the paper's CIFAR-10 and Tiny-ImageNet triggers);
any other count is 1 x N strips across the box's longer side (rows when it is at least
as tall as wide). Parts are numbered row by row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.synthesizers.base import Synthesizer

PROBE_SEED = 0


def changed_region(synthesizer: Synthesizer) -> Tensor:
    """[H, W] bool: pixels the trigger changes on a probe batch. ValueError when it changes
    none, or different pixels under different random draws (a moving trigger has no one
    region to split)."""
    c, h, w = synthesizer.input_shape
    noise = torch.rand((1, c, h, w), generator=torch.Generator().manual_seed(PROBE_SEED))
    probe = torch.cat([torch.zeros(1, c, h, w), torch.ones(1, c, h, w), noise])
    masks = []
    for seed in (1, 2):
        out = synthesizer.synthesize_inputs(probe, torch.Generator().manual_seed(seed))
        masks.append((out != probe).any(0).any(0))
    if not torch.equal(masks[0], masks[1]):
        raise ValueError(f"synthesizer '{synthesizer.name}' changes different pixels on each "
                         "call; splitting a trigger needs a fixed region")
    if not bool(masks[0].any()):
        raise ValueError(f"synthesizer '{synthesizer.name}' changes no pixel of the probe "
                         "images; there is no trigger region to split")
    return masks[0]


def _cuts(first: int, size: int, n: int) -> list[tuple[int, int]]:
    """n contiguous, non-empty [start, stop) pieces of [first, first + size)."""
    edges = [first + (i * size) // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def grid_regions(region: Tensor, parts: int) -> list[Tensor]:
    """The bounding box of `region` cut into `parts` pieces (module docstring): one [H, W]
    bool mask per part, row by row; together they tile the box."""
    rows = region.any(1).nonzero().flatten()
    cols = region.any(0).nonzero().flatten()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    h, w = r1 - r0, c1 - c0
    if parts == 4:
        shape = (2, 2)
    else:
        shape = (parts, 1) if h >= w else (1, parts)
    if shape[0] > h or shape[1] > w:
        raise ValueError(f"the trigger's {h}x{w} region cannot be cut into a "
                         f"{shape[0]}x{shape[1]} grid of {parts} parts")
    masks = []
    for top, bottom in _cuts(r0, h, shape[0]):
        for left, right in _cuts(c0, w, shape[1]):
            mask = torch.zeros_like(region)
            mask[top:bottom, left:right] = True
            masks.append(mask)
    return masks


class PartSynthesizer(Synthesizer):
    """Part `index` (0-based) of `parts` of a bound global trigger: the global trigger's
    change inside this part's piece of the region, the input elsewhere; labels, scoring
    rows and loss weights are the global trigger's."""

    def __init__(self, whole: Synthesizer, mask: Tensor, index: int, parts: int) -> None:
        super().__init__(whole.target, whole.label_mode)
        self.whole, self.mask, self.index, self.parts = whole, mask, index, parts
        self.input_shape, self.num_classes = whole.input_shape, whole.num_classes
        self.label_function = whole.label_function  # type: ignore[misc]

    @property
    def name(self) -> str:
        return f"{self.whole.name}[part {self.index + 1}/{self.parts}]"

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        full = self.whole.synthesize_inputs(x, generator)
        return torch.where(self.mask.to(x.device), full, x)

    def synthesize_labels(self, batch: Batch) -> Tensor:
        return self.whole.synthesize_labels(batch)

    def backdoor_target(self) -> int | None:
        return self.whole.backdoor_target()

    def counted(self, batch: Batch) -> Tensor:
        return self.whole.counted(batch)

    def loss_weights(self, batch: Batch) -> Tensor | None:
        return self.whole.loss_weights(batch)

    def spec(self) -> dict:
        return {**self.whole.spec(), "part": self.index + 1, "parts": self.parts}


def split_trigger(synthesizer: Synthesizer, parts: int) -> list[PartSynthesizer]:
    """The bound `synthesizer` as `parts` local triggers (ValueError when it cannot be)."""
    masks = grid_regions(changed_region(synthesizer), parts)
    return [PartSynthesizer(synthesizer, m, i, parts) for i, m in enumerate(masks)]
