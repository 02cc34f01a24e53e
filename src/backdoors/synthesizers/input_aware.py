"""Input-aware dynamic backdoor: a generator network draws a different trigger per input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.batch import Batch
from backdoors.data.dataset import Dataset
from backdoors.data.loader import Loader
from backdoors.models import MODELS
from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer
from backdoors.synthesizers.surrogate import (
    OptimisedSynthesizer,
    TrainingRows,
    channel_stats,
    derive_seed,
    in_memory,
    resolve,
    seeded_global_rng,
)


class EncoderDecoder(nn.Module):
    """A small conv encoder-decoder: [N, C, H, W] pixels -> [N, out, H, W] in (0, 1).

    Two 2x down-samplings and two up-samplings, the last one to the exact input size, so
    any image of at least 4x4 works. No batch norm: a row's trigger must not depend on
    the other rows of its batch.
    """

    def __init__(self, channels: int, out: int, width: int = 16) -> None:
        super().__init__()
        conv = lambda a, b: nn.Conv2d(a, b, 3, padding=1)  # noqa: E731
        self.encode = nn.Sequential(
            conv(channels, width), nn.ReLU(), conv(width, width), nn.ReLU(), nn.MaxPool2d(2),
            conv(width, 2 * width), nn.ReLU(), nn.MaxPool2d(2), conv(2 * width, 2 * width),
            nn.ReLU(),
        )
        self.middle = nn.Sequential(conv(2 * width, width), nn.ReLU())
        self.decode = nn.Sequential(conv(width, width), nn.ReLU(), conv(width, out))

    def forward(self, x: Tensor) -> Tensor:
        h = self.middle(F.interpolate(self.encode(x), scale_factor=2.0))
        return torch.sigmoid(self.decode(F.interpolate(h, size=x.shape[-2:])))


def diversity_loss(x: Tensor, other: Tensor, out: Tensor, other_out: Tensor) -> Tensor:
    """Nguyen & Tran's diversity term ||x - x'|| / ||g(x) - g(x')||: different inputs must
    get different triggers (mean over rows)."""
    inputs = (x - other).flatten(1).norm(dim=1)
    outputs = (out - other_out).flatten(1).norm(dim=1)
    return (inputs / (outputs + 1e-6)).mean()


@SYNTHESIZERS.register("input_aware")
class InputAwareSynthesizer(OptimisedSynthesizer):
    """Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
    arXiv 2010.08138): a generator makes a per-input pattern p(x) and mask m(x); a
    triggered input is x * (1 - m) + p * m, and one input's trigger does not work on
    another.

    `prepare()` follows the paper's two stages. First the mask generator is trained alone
    for `mask_epochs` (25) on lambda_norm * max(0, mean(m) - `mask_density`) +
    lambda_div * ||x - x'|| / ||m(x) - m(x')|| (`lambda_norm` 100, `mask_density` 0.032,
    `lambda_div` 1), then frozen. Then the pattern generator and a surrogate classifier
    train together for `surrogate_epochs`: in each batch a `backdoor_ratio` (0.1) share of
    rows carry their own trigger and the backdoor label, a `cross_ratio` (0.1) share carry
    another input's trigger and keep their label (cross-trigger mode), the rest are clean;
    loss = cross-entropy + lambda_div * pattern diversity. Generators use Adam
    (`generator_lr` 0.01, betas 0.5/0.9), the classifier SGD (`surrogate_lr`); in each
    stage the learning rates decay to zero on a cosine schedule over its epochs (the
    paper steps them down 10x at fixed epochs), so training ends on settled weights
    instead of at an arbitrary point of the generator/classifier oscillation.

    Poisoning (data attack): the same mix carries over. A poisoned training row is a cross
    sample with probability cross_ratio / (backdoor_ratio + cross_ratio) (drawn per row
    in prepare()): it gets the trigger of another training image and keeps its label;
    the others get their own trigger and the backdoor label. With the paper's ratios,
    `ratio: 0.2` poisons 10% backdoor + 10% cross rows. Test inputs get their own trigger.

    Simplifications: the paper controls the victim's training and trains the classifier
    itself; here the generator is trained against a surrogate and handed to data
    poisoning. The generators are smaller (`width` 16) and untrained before `prepare()`
    (seed 0): their output is a valid but un-optimised trigger.
    """

    def __init__(
        self,
        backdoor_ratio: float = 0.1,
        cross_ratio: float = 0.1,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        mask_density: float = 0.032,
        mask_epochs: int = 25,
        generator_lr: float = 0.01,
        width: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not (0.0 < backdoor_ratio and 0.0 <= cross_ratio and backdoor_ratio + cross_ratio < 1):
            raise ValueError("need backdoor_ratio > 0, cross_ratio >= 0 and their sum below 1")
        if not 0.0 < mask_density <= 1.0 or mask_epochs < 0 or generator_lr <= 0 or width < 1:
            raise ValueError("need 0 < mask_density <= 1, mask_epochs >= 0, generator_lr > 0 "
                             "and width >= 1")
        self.backdoor_ratio, self.cross_ratio = backdoor_ratio, cross_ratio
        self.lambda_div, self.lambda_norm, self.mask_density = lambda_div, lambda_norm, mask_density
        self.mask_epochs, self.generator_lr, self.width = mask_epochs, generator_lr, width
        self.cross = torch.empty(0, dtype=torch.bool)  # training row -> is a cross sample
        self.partner = torch.empty(0, dtype=torch.long)  # training row -> whose trigger
        self.train_images = torch.empty(0, dtype=torch.uint8)
        self._build_nets(0)

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        if min(input_shape[1:]) < 4:
            raise ValueError(f"the trigger generator needs images of at least 4x4, got "
                             f"{input_shape[1]}x{input_shape[2]}")
        self._build_nets(0)

    def _build_nets(self, seed: int) -> None:
        c = self.input_shape[0]
        with seeded_global_rng(seed):
            self.mask_net = EncoderDecoder(c, 1, self.width).eval().requires_grad_(False)
            self.pattern_net = EncoderDecoder(c, c, self.width).eval().requires_grad_(False)

    def mask(self, x: Tensor) -> Tensor:
        """The mask for inputs x, [N, 1, H, W]: the generator's output through the authors'
        steep threshold tanh(20 m - 10) / 2 + 1/2, so masks come out nearly binary."""
        return torch.tanh(20 * self.mask_net(x) - 10) / 2 + 0.5

    def stamp(self, x: Tensor, source: Tensor) -> Tensor:
        """x with the trigger generated from `source` (x itself for the backdoor mode)."""
        mask, pattern = self.mask(source), self.pattern_net(source)
        return x * (1 - mask) + pattern * mask

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        data = in_memory(train, self.name)
        n = len(data)
        self.rows, self.train_images = TrainingRows(data.images), data.images
        share = self.cross_ratio / (self.backdoor_ratio + self.cross_ratio)
        self.cross = torch.rand(n, generator=generator) < share
        shift = torch.randint(1, max(2, n), (n,), generator=generator)  # never the row itself
        self.partner = (torch.arange(n) + shift) % n
        device = resolve(self.device)
        self._build_nets(derive_seed(generator))
        mean, std = channel_stats(data.images)
        with seeded_global_rng(derive_seed(generator)):
            classifier = MODELS.build(self.surrogate_model, {}, "surrogate",
                                      num_classes=self.num_classes, input_shape=self.input_shape,
                                      mean=mean, std=std)
        loader = Loader(data, self.batch_size, device, shuffle=True, generator=generator)
        self._train_masks(loader, device)
        self._train_patterns(loader, classifier.to(device))
        self.mask_net.cpu().eval().requires_grad_(False)
        self.pattern_net.cpu().eval().requires_grad_(False)
        self.surrogate = classifier.eval().requires_grad_(False)

    def _adam(self, net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(net.parameters(), lr=self.generator_lr, betas=(0.5, 0.9))

    def _train_masks(self, loader: Loader, device: torch.device) -> None:
        """Stage 1: masks that are small (norm term) and differ between inputs (diversity)."""
        net = self.mask_net.to(device).train().requires_grad_(True)
        opt = self._adam(net)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.mask_epochs))
        for _ in range(self.mask_epochs):
            for batch in loader:
                x = batch.inputs
                other = x.roll(1, 0)  # pairs each row with another input of the batch
                mask = self.mask(x)
                other_mask = mask.roll(1, 0)  # = self.mask(other): rows are independent
                norm = F.relu(mask.mean() - self.mask_density)
                loss = (self.lambda_norm * norm
                        + self.lambda_div * diversity_loss(x, other, mask, other_mask))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            schedule.step()
        net.eval().requires_grad_(False)

    def _train_patterns(self, loader: Loader, classifier: nn.Module) -> None:
        """Stage 2: pattern generator and classifier, in backdoor, cross and clean modes."""
        net = self.pattern_net.to(loader.device).train().requires_grad_(True)
        gen_opt = self._adam(net)
        cls_opt = torch.optim.SGD(classifier.parameters(), lr=self.surrogate_lr, momentum=0.9,
                                  weight_decay=5e-4)
        epochs = max(1, self.surrogate_epochs)
        schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs)
                     for o in (gen_opt, cls_opt)]
        for _ in range(self.surrogate_epochs):
            classifier.train()
            for batch in loader:
                x, y = batch.inputs, batch.labels
                n_bd = max(1, round(len(x) * self.backdoor_ratio))
                n_cross = round(len(x) * self.cross_ratio)
                other = x.roll(1, 0)
                bd = slice(0, n_bd)
                cross = slice(n_bd, n_bd + n_cross)
                patterns, mask = net(x[bd]), self.mask(x[bd])  # = stamp(x[bd], x[bd])
                inputs = torch.cat([x[bd] * (1 - mask) + patterns * mask,
                                    self.stamp(x[cross], other[cross]), x[n_bd + n_cross :]])
                labels = torch.cat([Synthesizer.synthesize_labels(self, batch.select(bd)),
                                    y[n_bd:]])
                others = net(other[bd])
                loss = (F.cross_entropy(classifier(inputs), labels)
                        + self.lambda_div * diversity_loss(x[bd], other[bd], patterns, others))
                gen_opt.zero_grad(set_to_none=True)
                cls_opt.zero_grad(set_to_none=True)
                loss.backward()
                gen_opt.step()
                cls_opt.step()
            for schedule in schedules:
                schedule.step()

    def _cross_rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mask of rows that are cross samples, the training index of their partner)."""
        found = self.rows.find(x)
        hit = found >= 0
        cross = torch.zeros(len(x), dtype=torch.bool)
        partner = torch.full((len(x),), -1, dtype=torch.long)
        cross[hit], partner[hit] = self.cross[found[hit]], self.partner[found[hit]]
        return cross, partner

    @torch.no_grad()
    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.mask_net.to(x.device)
        self.pattern_net.to(x.device)
        source = x.clone()
        cross, partner = self._cross_rows(x)
        if bool(cross.any()):
            others = self.train_images[partner[cross]].to(x).div(255)
            source[cross.to(x.device)] = others
        return self.stamp(x, source).clamp(0, 1)

    def synthesize_labels(self, batch: Batch) -> Tensor:
        labels = super().synthesize_labels(batch)
        cross, _ = self._cross_rows(batch.inputs)
        return torch.where(cross.to(labels.device), batch.labels, labels)

    def state_tensors(self) -> dict[str, Tensor]:
        nets = {"mask": self.mask_net, "pattern": self.pattern_net}
        return {f"{name}.{key}": value for name, net in nets.items()
                for key, value in net.state_dict().items()}

    def spec(self) -> dict:
        return {**super().spec(), "backdoor_ratio": self.backdoor_ratio,
                "cross_ratio": self.cross_ratio, "mask_density": self.mask_density,
                "width": self.width}
