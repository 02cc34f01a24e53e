"""Activation clustering: within a class, poisoned samples form their own small cluster."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DatasetSanitizer, DefenseData, DefenseResult
from backdoors.defenses.training import predict

Reduction = Literal["ica", "pca"]


def reduce_dims(acts: np.ndarray, dims: int, seed: int, method: Reduction = "ica") -> np.ndarray:
    """FastICA to `dims` components, as in the paper; PCA when asked, or when ICA does not
    converge or breaks down (e.g. on rank-deficient ReLU activations)."""
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    dims = min(dims, acts.shape[0], acts.shape[1])
    if method == "pca":
        return PCA(dims, random_state=seed).fit_transform(acts)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            warnings.simplefilter("ignore", UserWarning)  # ICA whitening of low-rank data
            out = FastICA(dims, whiten="unit-variance", random_state=seed).fit_transform(acts)
        if np.isfinite(out).all():
            return out
    except (ConvergenceWarning, ValueError, np.linalg.LinAlgError):
        pass
    return PCA(dims, random_state=seed).fit_transform(acts)


def cluster_class(acts: np.ndarray, dims: int, seed: int, method: Reduction = "ica"
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """2-means on the reduced activations of one class: (cluster per sample, relative size
    of each cluster, silhouette score of the split)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    reduced = reduce_dims(acts, dims, seed, method)
    assign = KMeans(2, n_init=10, random_state=seed).fit_predict(reduced)
    sizes = np.bincount(assign, minlength=2) / len(assign)
    silhouette = float(silhouette_score(reduced, assign)) if 0 < sizes[0] < 1 else 0.0
    return assign, sizes, silhouette


@DEFENSES.register("activation_clustering")
class ActivationClustering(DatasetSanitizer):
    """Activation Clustering (arXiv 1811.03728): 2-means on each class's activations.

    Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava, "Detecting
    Backdoor Attacks on Deep Neural Networks by Activation Clustering".

    For each label of the training set as received, the penultimate activations
    (`model.features`) are reduced to `dims` (10) components with FastICA, as in the paper
    (`reduction: pca` uses PCA instead; ICA also falls back to PCA when it does not
    converge), and split by 2-means; a cluster holding less than `size_threshold` (0.35)
    of its class is deemed poisoned. The per-sample score, for AUROC, is
    1 - (relative size of the sample's cluster) + (silhouette score of its class's split):
    small clusters of cleanly split classes score highest. The classes with a small
    cluster and each class's silhouette are in `last_result.figures` after `score()`.

    ICA returns unit-variance components, so the direction that separates the poison
    weighs no more than nine others; on small models (the tiny tasks) 2-means then misses
    it, while PCA, which keeps the variance, finds it (see docs/defenses.md).
    """

    def __init__(self, dims: int = 10, size_threshold: float = 0.35,
                 reduction: Reduction = "ica", **base: Any) -> None:
        super().__init__(**base)
        if dims < 1 or not 0.0 < size_threshold <= 0.5:
            raise ValueError("dims must be >= 1 and size_threshold in (0, 0.5]")
        self.dims, self.size_threshold, self.reduction = dims, size_threshold, reduction
        self.last_result = DefenseResult()

    def score(self, model: nn.Module, data: DefenseData) -> Tensor:
        if data.train is None:
            raise RuntimeError("activation_clustering needs the training set")
        features, labels = predict(model, data.train, data, model.features)
        acts = features.flatten(1).double().numpy()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=data.generator))
        scores = torch.zeros(len(labels), dtype=torch.float64)
        flagged, silhouettes = [], {}
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().flatten()
            if len(idx) < 3:
                continue  # too few samples to split
            assign, sizes, silhouette = cluster_class(acts[idx.numpy()], self.dims, seed,
                                                     self.reduction)
            scores[idx] = torch.from_numpy(1.0 - sizes[assign] + silhouette)
            silhouettes[c] = silhouette
            if sizes.min() < self.size_threshold:
                flagged.append(c)
        self.last_result = DefenseResult(figures={"flagged_classes": flagged,
                                                  "silhouette": silhouettes})
        return scores.float()
