"""BTI-DBF: invert the trigger with a generator that keeps benign features and changes the
rest, then unlearn the inverted poisoned images (BTI-DBF(U))."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.loader import Loader
from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import accuracy, predict
from backdoors.defenses.unet import Generator
from backdoors.execution import LossScaler, autocast


def decoupling_loss(model: nn.Module, fmap: Tensor, mask: Tensor, labels: Tensor,
                    precision: str = "fp32") -> Tensor:
    """Step 1's objective for the feature mask m in [0, 1]: the masked feature map m * f
    should classify correctly (benign features) and its complement (1 - m) * f should not:
    CE(head(m f), y) - CE(head((1 - m) f), y), through the model's pool and head (run in
    `precision`; the losses in fp32)."""
    def logits(f: Tensor) -> Tensor:
        with autocast(f.device, precision):
            out = model.head(model.pool(f))
        return out.float()

    return (F.cross_entropy(logits(mask * fmap), labels)
            - F.cross_entropy(logits((1 - mask) * fmap), labels))


def inversion_loss(clean_feat: Tensor, gen_feat: Tensor, mask: Tensor, distance: Tensor,
                   norm_bound: float, feat_bound: float) -> tuple[Tensor, bool]:
    """Step 2's objective for the generator (the official code's): while the poisoned
    image is within `norm_bound` (mean squared distance to the clean one, normalised
    pixels) and its benign features within `feat_bound` (mean squared), move the backdoor
    features (1 - m) f away and keep the benign ones m f: -MSE_backdoor + 0.01 MSE_benign;
    outside, pull the image back: MSE(image). Returns (loss, inside the bounds)."""
    benign = F.mse_loss(mask * gen_feat, mask * clean_feat)
    backdoor = F.mse_loss((1 - mask) * gen_feat, (1 - mask) * clean_feat)
    inside = float(distance.detach()) <= norm_bound and float(benign.detach()) <= feat_bound
    return (-backdoor + 0.01 * benign if inside else distance), inside


def with_inverted(x: Tensor, generator: nn.Module, fraction: float,
                  generator_rng: torch.Generator) -> Tensor:
    """A copy of the batch where int(fraction * N + 1) random rows are replaced by their
    generated poisoned version (the official unlearning batch)."""
    n = min(len(x), int(fraction * len(x) + 1))
    rows = torch.randperm(len(x), generator=generator_rng)[:n].to(x.device)
    mixed = x.clone()
    with torch.no_grad():
        mixed[rows] = generator(x[rows])
    return mixed


def _batches(n: int, batch_size: int, rng: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=rng)
    yield from order.split(batch_size)


@DEFENSES.register("bti_dbf")
class BTIDBF(ModelRepair):
    """BTI-DBF(U) (ICLR 2024, OpenReview Tw9wemV6cb; no arXiv version).

    Xu, Huang, Li, Qin, Ren, "Towards Reliable and Efficient Backdoor Trigger Inversion
    via Decoupling Benign Features" (ICLR 2024).

    Backdoor trigger inversion without scanning classes: each of `rounds` rounds
      1. decouples benign features: a mask m = tanh(a)/2 + 1/2 over the model's last
         feature map (`model.feature_map`), trained `mask_epochs` with Adam (`mask_lr`)
         on the clean budget so that m * f classifies and (1 - m) * f does not
         (`decoupling_loss`);
      2. trains a generator G (`Generator`, a U-Net) for `generator_epochs` with Adam
         (`generator_lr`) so that G(x) keeps the benign features of x and moves the rest
         (the backdoor features) as far as it can, within a bound on the image change
         (`inversion_loss`, `norm_bound`, `feat_bound`); from the second round on G is also
         trained to send the model to the target label detected in the first round (the
         most frequent prediction on G(x + 0.03 noise));
      3. unlearns (BTI-DBF(U)): `unlearn_epochs` of Adam (`unlearn_lr`) on the model
         (train mode), where `poison_fraction` of each batch (plus one row) is replaced by
         G(x) with its true label, on CE + the MSE between the feature maps of the clean
         and the mixed batch.
    Rounds 1-2 work on a frozen copy of the model as it is at the start of the round; G
    and the two Adam optimisers carry over between rounds, as in the official code.

    Defaults are the official code's (github.com/xuxiong0214/BTIDBF, `cfg.py` and
    `btidbfu.py`): `rounds` 5, `mask_epochs` 20, `mask_lr` 0.01, `generator_epochs` 30,
    `generator_lr` 1e-3, a U-Net of `generator_width` 32 and `generator_levels` 4,
    `norm_bound` 0.3 (MSE of the images after the model's Normalize, as the official code
    works on normalised tensors), `feat_bound` 3, `unlearn_epochs` 30, `unlearn_lr` 1e-4,
    `poison_fraction` 0.1, `batch_size` 128. Deviations: the official code pre-trains its
    U-Net for 50 epochs to reproduce its input before inversion; here G(x) = clip(x + U(x),
    0, 1) with U's last layer zeroed starts as the identity without it. The mask is trained
    with the model in eval mode (the official code leaves a BN model in train mode there).
    Uses only the clean budget. Artifacts: the inverted poisoned images and triggers
    (G(x) - x) of 8 clean-budget images. The three steps' forward passes (model and
    generator) run in the run's precision, with the loss scaler under fp16.
    """

    NOISE = 0.03  # the official target-label detection's input noise

    def __init__(
        self,
        rounds: int = 5,
        mask_epochs: int = 20,
        mask_lr: float = 0.01,
        generator_epochs: int = 30,
        generator_lr: float = 1e-3,
        generator_width: int = 32,
        generator_levels: int = 4,
        norm_bound: float = 0.3,
        feat_bound: float = 3.0,
        unlearn_epochs: int = 30,
        unlearn_lr: float = 1e-4,
        poison_fraction: float = 0.1,
        batch_size: int = 128,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if min(rounds, mask_epochs, generator_epochs, unlearn_epochs) < 0:
            raise ValueError("rounds and the epoch counts must be >= 0")
        if min(mask_lr, generator_lr, unlearn_lr) <= 0 or batch_size < 1:
            raise ValueError("learning rates must be > 0 and batch_size >= 1")
        if generator_width < 1 or generator_levels < 1:
            raise ValueError("generator_width and generator_levels must be >= 1")
        if norm_bound <= 0 or feat_bound <= 0 or not 0.0 <= poison_fraction <= 1.0:
            raise ValueError("norm_bound and feat_bound must be > 0, poison_fraction in [0, 1]")
        self.rounds, self.mask_epochs, self.mask_lr = rounds, mask_epochs, mask_lr
        self.generator_epochs, self.generator_lr = generator_epochs, generator_lr
        self.generator_width, self.generator_levels = generator_width, generator_levels
        self.norm_bound, self.feat_bound = norm_bound, feat_bound
        self.unlearn_epochs, self.unlearn_lr = unlearn_epochs, unlearn_lr
        self.poison_fraction, self.batch_size = poison_fraction, batch_size

    def feature_mask(self, model: nn.Module, data: DefenseData) -> Tensor:
        """Step 1: the benign-feature mask of the frozen `model`, shaped like one feature
        map. Feature maps of the clean budget are computed once (the model is fixed)."""
        fmap, labels = predict(model, data.clean, data, model.feature_map)
        raw = torch.randn(fmap.shape[1:], generator=data.generator).to(data.device)
        raw.requires_grad_(True)
        optimizer = torch.optim.Adam([raw], lr=self.mask_lr)
        scaler = LossScaler(data.precision, data.device)
        for _ in data.progress.phase(range(self.mask_epochs), "decoupling benign features"):
            for idx in _batches(len(fmap), self.batch_size, data.generator):
                mask = torch.tanh(raw) / 2 + 0.5
                loss = decoupling_loss(model, fmap[idx].to(data.device), mask,
                                       labels[idx].to(data.device), data.precision)
                optimizer.zero_grad(set_to_none=True)
                scaler.backward(loss)
                scaler.step(optimizer)
        return (torch.tanh(raw) / 2 + 0.5).detach()

    def train_generator(self, model: nn.Module, generator: nn.Module, optimizer: Any,
                        mask: Tensor, data: DefenseData, target: int | None) -> float:
        """Step 2 on the frozen `model`; returns the share of steps inside the bounds."""
        normalize = getattr(model, "normalize", nn.Identity())
        loader = Loader(data.clean, self.batch_size, data.device, shuffle=True,
                        generator=data.generator)
        scaler = LossScaler(data.precision, data.device)
        inside, steps = 0, 0
        generator.train()
        for _ in data.progress.phase(range(self.generator_epochs),
                                     "training the backdoor generator"):
            for batch in loader:
                x = batch.inputs
                # The networks' forward passes in the run's precision, the losses in fp32.
                with autocast(data.device, data.precision):
                    poisoned = generator(x)
                    with torch.no_grad():
                        clean_feat = model.feature_map(x)
                    gen_feat = model.feature_map(poisoned)
                poisoned, clean_feat, gen_feat = poisoned.float(), clean_feat.float(), \
                    gen_feat.float()
                distance = F.mse_loss(normalize(poisoned), normalize(x))
                loss, ok = inversion_loss(clean_feat, gen_feat, mask, distance,
                                          self.norm_bound, self.feat_bound)
                if target is not None:
                    goal = torch.full_like(batch.labels, target)
                    with autocast(data.device, data.precision):
                        logits = model.head(model.pool(gen_feat))
                    loss = loss + F.cross_entropy(logits.float(), goal)
                optimizer.zero_grad(set_to_none=True)
                scaler.backward(loss)
                scaler.step(optimizer)
                inside, steps = inside + ok, steps + 1
        generator.eval()
        return inside / max(steps, 1)

    def detect_target(self, model: nn.Module, generator: nn.Module, data: DefenseData) -> int:
        """The class the model gives most often to G(x + noise) over the clean budget."""
        def inverted(x: Tensor) -> Tensor:
            noise = self.NOISE * torch.randn(x.shape, generator=data.generator)
            return model(generator(x + noise.to(x.device)))

        logits, _ = predict(model, data.clean, data, inverted)
        return int(torch.bincount(logits.argmax(1), minlength=data.num_classes).argmax())

    def unlearn(self, model: nn.Module, generator: nn.Module, optimizer: Any,
                data: DefenseData) -> None:
        """Step 3: fine-tune `model` (in place) on batches partly replaced by G(x)."""
        loader = Loader(data.clean, self.batch_size, data.device, shuffle=True,
                        generator=data.generator)
        scaler = LossScaler(data.precision, data.device)
        model.train()
        for _ in data.progress.phase(range(self.unlearn_epochs),
                                     "unlearning the inverted trigger"):
            for batch in loader:
                x = batch.inputs
                with autocast(data.device, data.precision):
                    mixed = with_inverted(x, generator, self.poison_fraction, data.generator)
                    feats = model.feature_map(torch.cat([x, mixed]))
                    logits = model.head(model.pool(feats[len(x):]))
                clean_feat, mixed_feat = feats.float().split(len(x))
                loss = (F.cross_entropy(logits.float(), batch.labels)
                        + F.mse_loss(mixed_feat, clean_feat))
                optimizer.zero_grad(set_to_none=True)
                scaler.backward(loss)
                scaler.step(optimizer)
        model.eval()

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        original, model = model, copy.deepcopy(model).eval()
        generator = Generator(data.input_shape[0], self.generator_width,
                              self.generator_levels).to(data.device).eval()
        gen_opt = torch.optim.Adam(generator.parameters(), lr=self.generator_lr)
        cls_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                   lr=self.unlearn_lr)
        target, density, inside = None, [], []
        for r in range(self.rounds):
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
            mask = self.feature_mask(frozen, data)
            inside.append(self.train_generator(frozen, generator, gen_opt, mask, data, target))
            density.append(float(mask.mean()))
            if r == 0:
                target = self.detect_target(frozen, generator, data)
            self.unlearn(model, generator, cls_opt, data)
        return Repaired(model=model, figures={
            "detected_target": target, "mask_density": density, "inside_bounds": inside,
            "inverted_success_before": self._success(original, generator, data, target),
            "inverted_success_after": self._success(model, generator, data, target),
            "clean_budget_accuracy_after": accuracy(model, data.clean, data),
        }, artifacts=self._pictures(generator, data))

    @staticmethod
    def _success(model: nn.Module, generator: nn.Module, data: DefenseData,
                 target: int | None) -> float | None:
        """Share of inverted clean-budget images that `model` assigns the detected target."""
        if target is None:
            return None
        logits, _ = predict(model, data.clean, data, lambda x: model(generator(x)))
        return float((logits.argmax(1) == target).double().mean())

    @staticmethod
    @torch.no_grad()
    def _pictures(generator: nn.Module, data: DefenseData) -> dict[str, Tensor]:
        x = data.clean.images[:8].to(data.device).float() / 255.0
        poisoned = generator.eval()(x)
        return {"inverted_poisoned": poisoned.cpu(), "inverted_triggers": (poisoned - x).cpu()}
