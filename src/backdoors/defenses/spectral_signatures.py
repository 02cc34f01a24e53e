"""Spectral signatures: poisoned samples stand out along the top singular direction of
their class's latent features."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DatasetSanitizer, DefenseData
from backdoors.defenses.results import Sanitized
from backdoors.defenses.training import predict

Center = Literal["clean", "class"]
# Fewer clean-budget samples of a class than this give too rough a centre and scale; such
# a class falls back to the paper's centring on its own mean.
MIN_CLEAN = 2


def spectral_scores(features: Tensor, labels: Tensor, clean_features: Tensor | None = None,
                    clean_labels: Tensor | None = None) -> Tensor:
    """Per sample: squared projection of its class's features on the class's top right
    singular vector (Tran et al., Algorithm 1). Pure maths, any [N, D].

    Without clean features the projection is taken from the class mean and left raw, as
    in the paper. With them (trusted samples of the same classes) it is taken from the mean
    of the class's clean samples and divided by their mean squared projection, so a clean
    sample scores about 1 in every class and scores compare across classes.
    """
    features = features.double()
    scores = torch.zeros(len(features), dtype=torch.float64)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            continue  # a lone sample has no direction of variance
        own = features[idx]
        top = torch.linalg.svd(own - own.mean(0, keepdim=True), full_matrices=False).Vh[0]
        trusted = None
        if clean_features is not None and clean_labels is not None:
            trusted = clean_features[clean_labels == c].double()
        if trusted is None or len(trusted) < MIN_CLEAN:
            scores[idx] = ((own - own.mean(0, keepdim=True)) @ top) ** 2
            if trusted is not None:  # normalised like the others, from the class itself
                scores[idx] /= scores[idx].mean().clamp(min=1e-12)
            continue
        centre = trusted.mean(0, keepdim=True)
        scale = (((trusted - centre) @ top) ** 2).mean().clamp(min=1e-12)
        scores[idx] = ((own - centre) @ top) ** 2 / scale
    return scores.float()


def top_share(scores: Tensor, share: float) -> Tensor:
    """Boolean mask of the round(share * N) highest scores (ties broken by position)."""
    k = min(len(scores), int(round(share * len(scores))))
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[scores.topk(k).indices] = True
    return mask


@DEFENSES.register("spectral_signatures")
class SpectralSignatures(DatasetSanitizer):
    """Spectral Signatures (arXiv 1811.00636): outliers along each class's top direction.

    Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks".

    For each label of the training set as received (poisoned labels included), the
    penultimate features (`model.features`) are projected on the top right singular
    vector of the class's centred features; a sample's score is its squared projection.
    The paper removes the 1.5 * `epsilon` highest-scoring samples of every class, epsilon
    being an upper bound on the poisoned share. Here `epsilon` (0.1) bounds the poisoned
    share of the whole training set and the 1.5 * epsilon * N highest scores over all
    classes are removed (`removed`), so the removal lands where the poison is.

    `center: clean` (default) measures the projection from the mean of the class's
    clean-budget samples and divides it by their mean squared projection. The paper
    centres on the class mean, which sits on the clean samples only while the poison is a
    small minority (its theorem's assumption): 10% of a 10-class training set relabelled
    to one class makes half of that class poisoned, the mean falls between the two groups
    and both score alike. The clean centre keeps the poison the outlier, and the scaling
    makes scores of different classes comparable, so one removal budget serves all classes.
    Classes with fewer than 2 clean-budget samples fall back to their own mean (scaled by
    their mean score). `center: class` is the paper's raw score, and then, as in the
    paper, 1.5 * epsilon of each class is removed (raw scores do not compare across
    classes).
    """

    def __init__(self, epsilon: float = 0.1, center: Center = "clean", **base: Any) -> None:
        super().__init__(**base)
        if not 0.0 <= epsilon <= 1.0 / 1.5:
            raise ValueError(f"epsilon must be in [0, 2/3] (1.5 * epsilon of the set is "
                             f"removed), got {epsilon}")
        self.epsilon, self.center = epsilon, center

    def sanitize(self, model: nn.Module, data: DefenseData) -> Sanitized:
        if data.train is None:
            raise RuntimeError("spectral_signatures needs the training set")
        features, labels = predict(model, data.train, data, model.features)
        if self.center == "class":
            scores = spectral_scores(features.flatten(1), labels)
            return Sanitized(scores=scores, removed=self._per_class(scores, labels))
        clean, clean_labels = predict(model, data.clean, data, model.features)
        scores = spectral_scores(features.flatten(1), labels, clean.flatten(1), clean_labels)
        return Sanitized(scores=scores, removed=top_share(scores, 1.5 * self.epsilon))

    def _per_class(self, scores: Tensor, labels: Tensor) -> Tensor:
        """Raw scores do not compare across classes: remove 1.5 epsilon of each."""
        mask = torch.zeros(len(scores), dtype=torch.bool)
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().flatten()
            mask[idx] = top_share(scores[idx], 1.5 * self.epsilon)
        return mask
