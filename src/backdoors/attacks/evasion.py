"""Evasion loss terms for the blind attack: train the backdoor to slip past defenses.

Blind Backdoors (Bagdasaryan & Shmatikov, arXiv 2005.03823), Section 6: the attacker adds
loss terms that make the backdoored model look clean to Neural Cleanse, SentiNet and
latent-space defenses, balanced with the main and backdoor losses by MGDA.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.attacks.balancers import Balancer, MGDABalancer
from backdoors.attacks.loss_terms import LOSS_TERMS, LossContext, LossTerm
from backdoors.errors import ConfigError
from backdoors.execution.precision import no_loss_scaling
from backdoors.synthesizers.base import Synthesizer


@LOSS_TERMS.register("neural_cleanse")
class NeuralCleanseEvasion(LossTerm):
    """Neural Cleanse evasion (Blind Backdoors; NC: Wang et al., S&P 2019).

    Each step first takes one Adam step (lr `mask_lr`, default 0.01) on a reverse-engineered
    trigger — mask = tanh(a)/2 + 0.5 over the image, pattern = tanh(b)/2 + 0.5 — so that
    clean inputs carrying it, (1 - mask) * x + mask * pattern, go to the backdoor target,
    against a |mask|_p penalty (`p_norm` 1 or 2, legacy nc_p_norm). The original applied
    the pattern to unmasked inputs; here it is masked, as NC does. The term then trains the
    model to keep TRUE labels on inputs with that reversed trigger, so NC's smallest
    reversed trigger stops pointing at the target.

    The reverse loss and the mask penalty are weighed as in Backdoors 101, which ran them
    as two tasks (neural_cleanse_part1, mask_norm) balanced by MGDA on the trigger's
    parameters: min-norm weights with the attack's MGDA normalisation (`loss` when the
    attack's balancer is fixed). The penalty then keeps the reversed trigger about as
    small as the one NC finds; a fixed NC-like weight (`mask_weight`, e.g. NC's initial
    1e-3) lets it grow over half the image, where the model learns to ignore a blob NC
    never looks for (docs/defenses.md has the figures). With the `mask_norm` term listed,
    the attack's own balancer weighs the two (fixed: `scales.neural_cleanse_part1` and
    `scales.mask_norm`, default 1) and the penalty is reported as `mask_norm`.
    """

    def __init__(self, mask_lr: float = 0.01, mask_weight: float | None = None,
                 p_norm: Literal[1, 2] = 1) -> None:
        if mask_lr <= 0 or (mask_weight is not None and mask_weight < 0):
            raise ValueError("mask_lr must be > 0 and mask_weight >= 0")
        self.mask_lr, self.mask_weight, self.p_norm = mask_lr, mask_weight, p_norm
        self.mask_norm: MaskNorm | None = None  # set by MaskNorm.bind
        self.balancer: Balancer = MGDABalancer("loss")

    def bind(self, terms: dict[str, LossTerm], balancer: Balancer) -> None:
        if isinstance(balancer, MGDABalancer) or "mask_norm" in terms:
            self.balancer = balancer

    def setup(self, model: nn.Module, synthesizer: Synthesizer) -> None:
        c, h, w = model.input_shape  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        self.mask_param = torch.randn(1, 1, h, w, generator=g).mul_(0.1).to(device)
        self.pattern_param = torch.randn(1, c, h, w, generator=g).mul_(0.1).to(device)
        self.mask_param.requires_grad_(True)
        self.pattern_param.requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.mask_param, self.pattern_param], lr=self.mask_lr)
        self.target = synthesizer.single_target("loss term neural_cleanse")
        self._reversed: LossContext | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"mask": self.mask_param.detach().clone(),
                "pattern": self.pattern_param.detach().clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.mask_param.copy_(state["mask"])
            self.pattern_param.copy_(state["pattern"])
        self.optimizer.load_state_dict(state["optimizer"])

    def trigger(self) -> tuple[Tensor, Tensor]:
        return torch.tanh(self.mask_param) / 2 + 0.5, torch.tanh(self.pattern_param) / 2 + 0.5

    def _stamp(self, x: Tensor) -> Tensor:
        mask, pattern = self.trigger()
        return (1 - mask) * x + mask * pattern

    def reverse(self, ctx: LossContext) -> None:
        """Step 1, once per training step whichever term asks first: improve the reversed
        trigger against the current model (model frozen)."""
        if self._reversed is ctx:
            return
        self._reversed = ctx
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        # The trigger's own optimizer steps true gradients, whatever the model's loss scale.
        try:
            with no_loss_scaling():
                target = torch.full_like(ctx.clean.labels, self.target)
                reverse = F.cross_entropy(ctx.model(self._stamp(ctx.clean.inputs)), target)
                mask, _ = self.trigger()
                penalty = mask.norm(p=self.p_norm)
                self.optimizer.zero_grad(set_to_none=True)
                if self.mask_weight is not None and self.mask_norm is None:
                    (reverse + self.mask_weight * penalty).backward()
                else:
                    scales = self.balancer.backward(
                        {"neural_cleanse_part1": reverse, "mask_norm": penalty},
                        [self.mask_param, self.pattern_param])
                    if self.mask_norm is not None:
                        self.mask_norm.record(float(penalty.detach()), scales["mask_norm"])
                self.optimizer.step()
        finally:
            for p in ctx.model.parameters():
                p.requires_grad_(True)

    def __call__(self, ctx: LossContext) -> Tensor:
        self.reverse(ctx)
        # Step 2: the model keeps true labels on inputs carrying the reversed trigger.
        with torch.no_grad():
            stamped = self._stamp(ctx.clean.inputs)
        return F.cross_entropy(ctx.model(stamped), ctx.clean.labels)


@LOSS_TERMS.register("mask_norm")
class MaskNorm(LossTerm):
    """Mask penalty of Neural Cleanse evasion as a task of its own (Backdoors 101's mask_norm).

    Bagdasaryan, Shmatikov, "Blind Backdoors in Deep Learning Models", arXiv 2005.03823:
    |mask|_p of the trigger `neural_cleanse` reverses.

    Its gradient reaches only the reversed mask: in the reverse step of `neural_cleanse`
    the attack's balancer weighs it against the reverse loss (MGDA: min-norm weights over
    the trigger's parameters, as Backdoors 101 did; fixed: `scales.mask_norm`, default 1,
    which overrides `neural_cleanse`'s `mask_weight`). Its value is reported as the
    `mask_norm` loss (TensorBoard Train/Loss_mask_norm) and its weight as
    Train/Scale_mask_norm; the model's balancer leaves it out. The norm is
    `neural_cleanse`'s `p_norm`. No options.
    """

    trains_model = False

    def bind(self, terms: dict[str, LossTerm], balancer: Balancer) -> None:
        evasion = terms.get("neural_cleanse")
        if not isinstance(evasion, NeuralCleanseEvasion):
            raise ConfigError("attack.loss_terms: 'mask_norm' penalises the mask reversed by "
                              "the 'neural_cleanse' evasion term; add 'neural_cleanse' or "
                              "remove 'mask_norm'")
        evasion.mask_norm = self
        self.evasion = evasion
        self.value, self.scale = 0.0, 0.0

    def penalty(self, mask: Tensor) -> Tensor:
        """|mask|_p, differentiable in the mask."""
        return mask.norm(p=self.evasion.p_norm)

    def record(self, value: float, scale: float) -> None:
        self.value, self.scale = value, scale

    def __call__(self, ctx: LossContext) -> Tensor:
        self.evasion.reverse(ctx)
        ctx.scales["mask_norm"] = self.scale
        return torch.tensor(self.value, device=ctx.clean.inputs.device)


def grad_cam(model: nn.Module, x: Tensor, classes: Tensor, create_graph: bool = True
             ) -> Tensor:
    """Grad-CAM heat maps [N, h, w] of `classes`, normalised to max 1 per image and
    differentiable when `create_graph` (for a loss); works for any model exposing
    feature_map/pool/head."""
    fmap = model.feature_map(x)  # type: ignore[operator]
    if not fmap.requires_grad:  # frozen weights (a defense's copy): differentiate the map
        fmap = fmap.detach().requires_grad_(True)
    logits = model.head(model.pool(fmap))  # type: ignore[operator]
    score = logits.gather(1, classes[:, None]).sum()
    grads = torch.autograd.grad(score, fmap, create_graph=create_graph)[0]
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(1))
    return cam / cam.flatten(1).amax(1).clamp(min=1e-8)[:, None, None]


@LOSS_TERMS.register("sentinet_evasion")
class SentiNetEvasion(LossTerm):
    """SentiNet evasion (Blind Backdoors; SentiNet: Chou et al., arXiv 1812.00292).

    SentiNet finds the trigger as the region Grad-CAM marks salient for the predicted
    class. This term penalises the mean absolute difference between the target-class
    Grad-CAM maps of triggered and clean versions of the same images, so the trigger does
    not stand out. Uses the model's last feature map, whatever its channel count (the
    original hard-coded 512 channels).
    """

    uses_backdoor = True

    def setup(self, model: nn.Module, synthesizer: Synthesizer) -> None:
        self.target = synthesizer.single_target("loss term sentinet_evasion")

    def __call__(self, ctx: LossContext) -> Tensor:
        rows = ctx.backdoor.poisoned
        if int(rows.sum()) == 0:
            return ctx.clean.inputs.new_zeros(())
        target = torch.full((int(rows.sum()),), self.target, device=rows.device)
        triggered = grad_cam(ctx.model, ctx.backdoor.inputs[rows], target)
        clean = grad_cam(ctx.model, ctx.clean.inputs[rows], target)
        return (triggered - clean).abs().mean()


@LOSS_TERMS.register("spectral_evasion")
class SpectralEvasion(LossTerm):
    """Latent evasion against spectral signatures / activation clustering (Blind Backdoors).

    Keeps the penultimate features of triggered inputs close to those a frozen copy of the
    pre-attack model gives them: `similarity` norm (L2 distance, default) or cosine (1 -
    cosine similarity); legacy key spectral_similarity.
    """

    uses_backdoor = True

    def __init__(self, similarity: Literal["norm", "cosine"] = "norm") -> None:
        self.similarity = similarity

    def setup(self, model: nn.Module, synthesizer: Synthesizer) -> None:
        self.frozen = copy.deepcopy(model).eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen.load_state_dict(state["frozen"])

    def __call__(self, ctx: LossContext) -> Tensor:
        x = ctx.backdoor.inputs
        ours = ctx.model.features(x)  # type: ignore[operator]
        with torch.no_grad():
            ref = self.frozen.features(x)
        if self.similarity == "cosine":
            return (1 - F.cosine_similarity(ours, ref, dim=1)).mean()
        return (ours - ref).norm(dim=1).mean()
