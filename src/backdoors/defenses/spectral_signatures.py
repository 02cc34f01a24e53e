"""Spectral signatures: poisoned samples stand out along the top singular direction of
their class's latent features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DatasetSanitizer, DefenseData
from backdoors.defenses.training import predict


def spectral_scores(features: Tensor, labels: Tensor) -> Tensor:
    """Per sample: squared projection of its class-centred features on the top right
    singular vector of its class (Tran et al., Algorithm 1). Pure maths, any [N, D]."""
    features = features.double()
    scores = torch.zeros(len(features), dtype=torch.float64)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            continue  # a lone sample has no direction of variance
        centred = features[idx] - features[idx].mean(0, keepdim=True)
        top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        scores[idx] = (centred @ top) ** 2
    return scores.float()


@DEFENSES.register("spectral_signatures")
class SpectralSignatures(DatasetSanitizer):
    """Spectral Signatures (arXiv 1811.00636): outliers along each class's top direction.

    Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks".

    For each label of the training set as received (poisoned labels included), the
    penultimate features (`model.features`) are centred and every sample is scored by its
    squared projection on their top right singular vector. The paper removes the
    1.5 * epsilon highest-scoring samples of each class and retrains; here the scores are
    returned for every sample in dataset order (the runner reports AUROC and the recall of
    the top 1.5x) and removal/retraining is left to the caller. Scores are not normalised
    across classes, as in the paper. No options (`clean_fraction` is not used).
    """

    def score(self, model: nn.Module, data: DefenseData) -> Tensor:
        if data.train is None:
            raise RuntimeError("spectral_signatures needs the training set")
        features, labels = predict(model, data.train, data, model.features)
        return spectral_scores(features.flatten(1), labels)
