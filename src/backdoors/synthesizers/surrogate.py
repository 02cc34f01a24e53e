"""Shared machinery for triggers computed in `prepare()`: a surrogate classifier, PGD, and
a content index that tells training rows from test rows.

An optimised trigger needs a model to optimise against before the victim exists, so it
trains its own small surrogate from the model registry. Everything here is deterministic
given a torch.Generator: model initialisation runs under a forked global RNG seeded from
it, and batches and random starts are drawn from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.data.loader import Loader
from backdoors.errors import ConfigError
from backdoors.models import MODELS
from backdoors.synthesizers.base import Synthesizer


def derive_seed(generator: torch.Generator) -> int:
    """A fresh seed drawn from `generator` (advances it)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block (e.g. layer initialisation, which uses torch's global RNG) under `seed`
    without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, C, H, W], in pixel units [0, 1]. The
    surrogate's Normalize layer needs them and bind() does not pass the task's."""
    x = images.float().div(255.0).transpose(0, 1).flatten(1)
    return x.mean(1).tolist(), x.std(1).clamp(min=1e-3).tolist()


def resolve(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    targeted: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L_inf projected gradient descent in pixel space (Madry et al., arXiv 1706.06083).

    Untargeted: raise the cross-entropy of `y`; targeted: lower it. Starts at a uniform
    random point of the eps-ball when a generator is given, else at `x`. Returns
    x + delta with |delta| <= eps and pixels in [0, 1]. The caller sets `model.eval()`.
    """
    delta = torch.zeros_like(x)
    if generator is not None:
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1).mul_(eps).to(x)
    delta = (x + delta).clamp(0, 1) - x
    direction = -1.0 if targeted else 1.0
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + direction * alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def train_surrogate(
    train: ArrayDataset,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int,
    generator: torch.Generator,
    model: str = "tiny_cnn",
    lr: float = 0.05,
    batch_size: int = 128,
    device: torch.device | None = None,
    robust_eps: float = 0.0,
    robust_steps: int = 0,
) -> nn.Module:
    """Train a registered model on `train` with SGD (momentum 0.9, weight decay 5e-4, cosine
    schedule over the epochs); return it in eval mode with gradients off for its weights.

    With `robust_steps` > 0 every batch is replaced by PGD adversarial examples (eps
    `robust_eps`, step 2.5 * eps / steps) first: Madry et al.'s adversarial training.
    """
    device = device or torch.device("cpu")
    with seeded_global_rng(derive_seed(generator)):
        net = MODELS.build(model, {}, "surrogate", num_classes=num_classes,
                           input_shape=tuple(input_shape), mean=list(mean), std=list(std))
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    loader = Loader(train, batch_size, device, shuffle=True, generator=generator)
    for _ in range(epochs):
        for batch in loader:
            x = batch.inputs
            if robust_steps > 0:
                net.eval()  # attack the current weights without touching batch-norm stats
                x = pgd(net, x, batch.labels, robust_eps, 2.5 * robust_eps / robust_steps,
                        robust_steps, generator=generator)
            net.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), batch.labels).backward()
            opt.step()
        schedule.step()
    return net.eval().requires_grad_(False)


def _digest(row: Any) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


class TrainingRows:
    """Recognises training images by their pixels.

    Some triggers treat a row differently when it is one of the training images that
    `prepare()` saw (poisoning time) than when it is any other input (test time): the
    label-consistent attack swaps in a precomputed adversarial image, Narcissus and
    Adaptive-Blend poison with a weaker trigger than they test with. `synthesize_inputs`
    sees only pixels, and batch indices cannot tell the two apart (test batches carry
    indices into the test set), but the uint8 content can: data poisoning hands over the
    stored pixels unchanged (x = images / 255), so a lookup is exact, while test,
    augmented or other images are not found and get the test-time treatment.
    """

    def __init__(self, images: Tensor | None = None) -> None:
        self._index: dict[bytes, int] = {}
        if images is not None:
            flat = images.detach().cpu().flatten(1).numpy()
            for i in range(len(flat)):
                self._index.setdefault(_digest(flat[i]), i)

    def __len__(self) -> int:
        return len(self._index)

    def find(self, x: Tensor) -> Tensor:
        """Training-set index of each row of the float batch `x`, or -1 (a CPU tensor)."""
        out = torch.full((len(x),), -1, dtype=torch.long)
        if not self._index:
            return out
        scaled = x.detach().cpu().float().flatten(1) * 255.0
        levels = scaled.round()
        exact = (scaled - levels).abs().amax(1) < 1e-3  # rows off the uint8 grid: not stored
        pixels = levels.clamp(0, 255).to(torch.uint8).numpy()
        for i in exact.nonzero().flatten().tolist():
            out[i] = self._index.get(_digest(pixels[i]), -1)
        return out


def in_memory(train: Dataset, who: str) -> ArrayDataset:
    """`train` as an ArrayDataset, or a ConfigError: optimised triggers read it whole."""
    if not isinstance(train, ArrayDataset):
        raise ConfigError(f"synthesizer {who} optimises its trigger on an in-memory training "
                          "set; this task streams its data")
    return train.to("cpu")


class OptimisedSynthesizer(Synthesizer):
    """Base for triggers optimised against a surrogate classifier in `prepare()`.

    Shared options: `surrogate_model` (a registered model, default `tiny_cnn`; the papers
    use larger, often pre-trained, networks), `surrogate_epochs` (10), `surrogate_lr`
    (0.05), `batch_size` (128, for surrogate training and trigger optimisation) and
    `device` (`auto`: CUDA when present). Results are deterministic given prepare()'s
    generator on one device.
    """

    def __init__(
        self,
        surrogate_model: str = "tiny_cnn",
        surrogate_epochs: int = 10,
        surrogate_lr: float = 0.05,
        batch_size: int = 128,
        device: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if surrogate_model not in MODELS:
            raise ValueError(f"unknown surrogate_model '{surrogate_model}'; expected one of: "
                             f"{', '.join(MODELS.names())}")
        if surrogate_epochs < 0 or surrogate_lr <= 0 or batch_size < 1:
            raise ValueError("need surrogate_epochs >= 0, surrogate_lr > 0, batch_size >= 1")
        self.surrogate_model, self.surrogate_epochs = surrogate_model, surrogate_epochs
        self.surrogate_lr, self.batch_size, self.device = surrogate_lr, batch_size, device
        self.rows = TrainingRows()
        self.surrogate: nn.Module | None = None  # kept after prepare() for inspection

    def fit_surrogate(
        self, train: ArrayDataset, generator: torch.Generator, robust_eps: float = 0.0,
        robust_steps: int = 0,
    ) -> nn.Module:
        """Train (and keep) this trigger's surrogate on `train`."""
        mean, std = channel_stats(train.images)
        self.surrogate = train_surrogate(
            train, self.input_shape, self.num_classes, mean, std, self.surrogate_epochs,
            generator, model=self.surrogate_model, lr=self.surrogate_lr,
            batch_size=self.batch_size, device=resolve(self.device), robust_eps=robust_eps,
            robust_steps=robust_steps)
        return self.surrogate

    def require_all_to_one(self) -> None:
        """Clean-label triggers pull inputs toward one target class."""
        if self.label_mode != "all_to_one":
            raise ConfigError(f"synthesizer {self.name} is an all-to-one attack; "
                              "set synthesizer.label_mode: all_to_one")
