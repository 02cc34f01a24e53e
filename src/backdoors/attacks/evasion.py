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

from backdoors.attacks.loss_terms import LOSS_TERMS, LossContext, LossTerm
from backdoors.synthesizers.base import Synthesizer


@LOSS_TERMS.register("neural_cleanse")
class NeuralCleanseEvasion(LossTerm):
    """Neural Cleanse evasion (Blind Backdoors; NC: Wang et al., S&P 2019).

    Each step first takes one Adam step (lr `mask_lr`, default 0.01) on a reverse-engineered
    trigger — mask = tanh(a)/2 + 0.5 over the image, pattern = tanh(b)/2 + 0.5 — so that
    clean inputs carrying it, (1 - mask) * x + mask * pattern, go to the backdoor target,
    with a `mask_weight` (default 1e-3) times |mask|_p penalty (`p_norm` 1 or 2, legacy
    nc_p_norm). The original applied the pattern to unmasked inputs; here it is masked, as
    NC does. The term then trains the model to keep TRUE labels on inputs with that
    reversed trigger, so NC's smallest reversed trigger stops pointing at the target.
    """

    def __init__(self, mask_lr: float = 0.01, mask_weight: float = 1e-3,
                 p_norm: Literal[1, 2] = 1) -> None:
        if mask_lr <= 0 or mask_weight < 0:
            raise ValueError("mask_lr must be > 0 and mask_weight >= 0")
        self.mask_lr, self.mask_weight, self.p_norm = mask_lr, mask_weight, p_norm

    def setup(self, model: nn.Module, synthesizer: Synthesizer) -> None:
        c, h, w = model.input_shape  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        self.mask_param = torch.randn(1, 1, h, w, generator=g).mul_(0.1).to(device)
        self.pattern_param = torch.randn(1, c, h, w, generator=g).mul_(0.1).to(device)
        self.mask_param.requires_grad_(True)
        self.pattern_param.requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.mask_param, self.pattern_param], lr=self.mask_lr)
        self.target = synthesizer.target

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

    def __call__(self, ctx: LossContext) -> Tensor:
        x = ctx.clean.inputs
        # Step 1: improve the reversed trigger against the current model (model frozen).
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        try:
            target = torch.full_like(ctx.clean.labels, self.target)
            mask, _ = self.trigger()
            reverse = F.cross_entropy(ctx.model(self._stamp(x)), target) + \
                self.mask_weight * mask.norm(p=self.p_norm)
            self.optimizer.zero_grad()
            reverse.backward()
            self.optimizer.step()
        finally:
            for p in ctx.model.parameters():
                p.requires_grad_(True)
        # Step 2: the model keeps true labels on inputs carrying the reversed trigger.
        with torch.no_grad():
            stamped = self._stamp(x)
        return F.cross_entropy(ctx.model(stamped), ctx.clean.labels)


def grad_cam(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """Grad-CAM heat maps [N, h, w] of `classes`, differentiable (create_graph), normalised
    to max 1 per image; works for any model exposing feature_map/pool/head."""
    fmap = model.feature_map(x)  # type: ignore[operator]
    logits = model.head(model.pool(fmap))  # type: ignore[operator]
    score = logits.gather(1, classes[:, None]).sum()
    grads = torch.autograd.grad(score, fmap, create_graph=True)[0]
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
        self.target = synthesizer.target

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
