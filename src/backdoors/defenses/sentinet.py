"""SentiNet: a trigger is a small salient region that hijacks any image it is pasted on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.attacks.evasion import grad_cam
from backdoors.defenses.base import DEFENSES, DefenseData, InputDetector
from backdoors.errors import DataError

# Pasted copies per forward pass at most (inputs x n), so memory stays bounded for large
# images or n.
CHUNK = 4096


def salient_masks(model: nn.Module, x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(predicted class [N], binary mask [N, 1, H, W]): the pixels where the Grad-CAM map of
    the predicted class, upsampled to the input, reaches `threshold` of its maximum."""
    with torch.enable_grad():
        with torch.no_grad():
            pred = model(x).argmax(1)
        cam = grad_cam(model, x, pred, create_graph=False).detach()
    cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam / cam.flatten(1).amax(1).clamp(min=1e-8)[:, None, None, None]
    return pred, (cam >= threshold).to(x.dtype)


def fit_boundary(conf: np.ndarray, fooled: np.ndarray, bins: int, degree: int) -> np.ndarray:
    """Polynomial coefficients of the upper edge of clean inputs in the (average inert
    confidence, fooled share) plane: the highest fooled share in each of `bins` equal
    confidence intervals, fitted by least squares (degree lowered to fit few points)."""
    edges = np.linspace(conf.min(), conf.max() + 1e-9, bins + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    xs, ys = [], []
    for b in range(bins):
        inside = which == b
        if inside.any():
            top = int(np.argmax(np.where(inside, fooled, -np.inf)))
            xs.append(conf[top])
            ys.append(fooled[top])
    return np.polyfit(np.array(xs), np.array(ys), min(degree, len(xs) - 1))


@DEFENSES.register("sentinet")
class SentiNet(InputDetector):
    """SentiNet (arXiv 1812.00292): salient regions that fool held-out images are triggers.

    Chou, Tramèr, Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against
    Deep Learning Systems".

    For an input, the Grad-CAM map of its predicted class (`model.feature_map`, any model
    exposing its last feature map) is upsampled and thresholded at `threshold` (0.5) of its
    maximum: the salient region. The region is pasted onto `n` (32) held-out clean images
    and the fooled share is the share of them (among those of another class) the model
    then assigns the input's class; an inert pattern (uniform noise in the same region)
    is pasted onto the same images and the average confidence (top softmax probability)
    recorded. A universal trigger fools many images while noise in its small region leaves
    the model confident; a natural salient region does neither as well.

    `fit` splits the clean budget in two: held-out images to paste onto, and clean inputs
    whose (confidence, fooled) points give the decision boundary as in the paper: the
    highest fooled share in each of `bins` (10) confidence intervals, fitted by a
    polynomial of `degree` (2). Score: fooled share minus the boundary at the input's
    confidence (higher = more suspicious); the paper then thresholds the distance, the
    runner reports AUROC instead. Simplified from the paper: one salient region (the
    predicted class; no class proposals from other classes' maps subtracted).
    """

    def __init__(self, n: int = 32, threshold: float = 0.5, bins: int = 10, degree: int = 2,
                 **base: Any) -> None:
        super().__init__(**base)
        if n < 1 or bins < 1 or degree < 0 or not 0.0 < threshold <= 1.0:
            raise ValueError("n and bins must be >= 1, degree >= 0, threshold in (0, 1]")
        self.n, self.threshold, self.bins, self.degree = n, threshold, bins, degree
        self._targets: tuple[Tensor, Tensor] | None = None
        self._generator: torch.Generator | None = None
        self._boundary: np.ndarray | None = None

    def fit(self, model: nn.Module, data: DefenseData) -> None:
        if len(data.clean) < 4:
            raise DataError(f"sentinet needs at least 4 clean-budget images, got "
                            f"{len(data.clean)}; raise clean_fraction")
        order = torch.randperm(len(data.clean), generator=data.generator)
        half = len(order) // 2
        held, calib = order[:half], order[half:]
        images = data.clean.images.float() / 255.0
        self._targets = (images[held].to(data.device), data.clean.labels[held].to(data.device))
        self._generator = data.generator
        conf, fooled = self.probe(model, images[calib].to(data.device))
        self._boundary = fit_boundary(conf.double().cpu().numpy(),
                                      fooled.double().cpu().numpy(), self.bins, self.degree)

    @torch.no_grad()
    def probe(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(average inert confidence, fooled share) per input of x."""
        if self._targets is None or self._generator is None:
            raise RuntimeError("call fit(model, data) before scoring")
        was_training = model.training
        model.eval()
        targets, target_labels = self._targets
        step = max(1, CHUNK // self.n)
        conf, fooled = [], []
        for start in range(0, len(x), step):
            part = x[start:start + step]
            pred, mask = salient_masks(model, part, self.threshold)
            pick = torch.randint(len(targets), (len(part), self.n), generator=self._generator)
            pick = pick.to(targets.device)
            base = targets[pick]  # [B, n, C, H, W]
            m = mask[:, None]
            pasted = (1 - m) * base + m * part[:, None]
            noise = torch.rand(base.shape, generator=self._generator).to(base.device)
            inert = (1 - m) * base + m * noise
            flat = lambda t: t.flatten(0, 1)  # noqa: E731
            hits = model(flat(pasted)).argmax(1).view(len(part), self.n) == pred[:, None]
            other = target_labels[pick] != pred[:, None]
            fooled.append((hits & other).sum(1) / other.sum(1).clamp(min=1))
            probs = F.softmax(model(flat(inert)).float(), dim=1).amax(1)
            conf.append(probs.view(len(part), self.n).mean(1))
        model.train(was_training)
        return torch.cat(conf), torch.cat(fooled).float()

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        if self._boundary is None:
            raise RuntimeError("call fit(model, data) before score(model, x)")
        conf, fooled = self.probe(model, x)
        edge = np.polyval(self._boundary, conf.double().cpu().numpy())
        return fooled.cpu() - torch.from_numpy(edge).float()
