"""Activation clustering: within a class, poisoned samples form their own cluster."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from backdoors.defenses.base import DEFENSES, DatasetSanitizer, DefenseData
from backdoors.defenses.results import Sanitized
from backdoors.defenses.training import predict

Reduction = Literal["ica", "pca"]
Analysis = Literal["clean", "size"]


def fit_reducer(acts: np.ndarray, dims: int, seed: int, method: Reduction = "ica") -> Any:
    """A fitted FastICA to `dims` components, as in the paper; PCA when asked, or when ICA
    does not converge or breaks down (e.g. on rank-deficient ReLU activations)."""
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    dims = min(dims, acts.shape[0], acts.shape[1])
    if method == "ica":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                warnings.simplefilter("ignore", UserWarning)  # ICA whitening of low-rank data
                ica = FastICA(dims, whiten="unit-variance", random_state=seed).fit(acts)
            if np.isfinite(ica.transform(acts)).all():
                return ica
        except (ConvergenceWarning, ValueError, np.linalg.LinAlgError):
            pass
    return PCA(dims, random_state=seed).fit(acts)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)))


@dataclass
class Split:
    """2-means split of one class: cluster per sample, relative cluster sizes, silhouette,
    and how many of the class's clean-budget samples fall in each cluster."""

    assign: np.ndarray
    sizes: np.ndarray
    silhouette: float
    clean_counts: np.ndarray


def cluster_class(acts: np.ndarray, dims: int, seed: int, method: Reduction = "ica",
                  clean: np.ndarray | None = None) -> Split:
    """Reduce one class's activations, split them by 2-means, and place its clean-budget
    activations `clean` (if any) in the nearer cluster."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    reducer = fit_reducer(acts, dims, seed, method)
    reduced = reducer.transform(acts)
    kmeans = KMeans(2, n_init=10, random_state=seed).fit(reduced)
    assign = kmeans.labels_
    sizes = np.bincount(assign, minlength=2) / len(assign)
    silhouette = float(silhouette_score(reduced, assign)) if 0 < sizes[0] < 1 else 0.0
    counts = np.zeros(2, dtype=np.int64)
    if clean is not None and len(clean):
        counts = np.bincount(kmeans.predict(reducer.transform(clean)), minlength=2)
    return Split(assign, sizes, silhouette, counts)


def poisoned_clusters(split: Split, size_threshold: float, alpha: float,
                      analysis: Analysis = "clean") -> tuple[np.ndarray, np.ndarray]:
    """(poisoned flag, suspicion score) per cluster of one class.

    `size`: the paper's relative size comparison, a cluster under `size_threshold` of its
    class is poisoned; score 1 - size + silhouette. `clean`: the class's clean-budget
    samples land in each legitimate cluster in proportion to its size, and avoid a poisoned
    one; a cluster is poisoned when they are improbably few in it (binomial tail below
    `alpha`), or when it is under `size_threshold` and holds none of them (the size rule,
    where the budget is too small to tell); score -log10 of that tail.
    """
    sizes, counts = split.sizes, split.clean_counts
    small = sizes < size_threshold
    if analysis == "size":
        return small, 1.0 - sizes + split.silhouette
    total = int(counts.sum())
    tails = np.array([binomial_tail(int(k), total, float(s)) for k, s in zip(counts, sizes,
                                                                           strict=True)])
    flagged = (tails < alpha) | (small & (counts == 0))
    return flagged, -np.log10(np.maximum(tails, 1e-300))


@DEFENSES.register("activation_clustering")
class ActivationClustering(DatasetSanitizer):
    """Activation Clustering (arXiv 1811.03728): 2-means on each class's activations.

    Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava, "Detecting
    Backdoor Attacks on Deep Neural Networks by Activation Clustering".

    For each label of the training set as received, the penultimate activations
    (`model.features`) are reduced to `dims` (10) components and split by 2-means.
    `reduction: pca` (default) keeps the variance; the paper's FastICA (`reduction: ica`,
    falling back to PCA when it does not converge) returns unit-variance components, so
    the direction that separates the poison weighs no more than nine others and 2-means
    splits it less cleanly (docs/defenses.md has the figures).

    Which cluster is poisoned (`analysis`): the paper's relative size comparison (`size`:
    a cluster under `size_threshold`, 0.35, of its class) fails once poison is half its
    target class, as 10% of a 10-class set relabelled to one class is. `clean` (default)
    asks the clean budget instead, in the spirit of the paper's exclusionary
    reclassification (trusted data decides which cluster is legitimate): clean samples of
    the class fall in a legitimate cluster in proportion to its size and avoid a poisoned
    one. A cluster is removed when they are improbably few in it (binomial tail below
    `alpha`, 0.01), or when it is under `size_threshold` and holds none (the size rule,
    for budgets too small to tell). Per-sample score, for AUROC: -log10 of that tail
    (`size`: 1 - relative size + silhouette). Flagged classes, silhouettes and clean
    counts are reported with the scores.
    """

    def __init__(self, dims: int = 10, size_threshold: float = 0.35,
                 reduction: Reduction = "pca", analysis: Analysis = "clean",
                 alpha: float = 0.01, **base: Any) -> None:
        super().__init__(**base)
        if dims < 1 or not 0.0 < size_threshold <= 0.5:
            raise ValueError("dims must be >= 1 and size_threshold in (0, 0.5]")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.dims, self.size_threshold, self.reduction = dims, size_threshold, reduction
        self.analysis, self.alpha = analysis, alpha

    def sanitize(self, model: nn.Module, data: DefenseData) -> Sanitized:
        if data.train is None:
            raise RuntimeError("activation_clustering needs the training set")
        features, labels = predict(model, data.train, data, model.features)
        acts = features.flatten(1).double().numpy()
        clean, clean_labels = predict(model, data.clean, data, model.features)
        clean_acts = clean.flatten(1).double().numpy()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=data.generator))
        scores = torch.zeros(len(labels), dtype=torch.float64)
        removed = torch.zeros(len(labels), dtype=torch.bool)
        flagged, silhouettes, clean_counts = [], {}, {}
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().flatten()
            if len(idx) < 3:
                continue  # too few samples to split
            trusted = clean_acts[(clean_labels == c).numpy()] if self.analysis == "clean" \
                else None
            split = cluster_class(acts[idx.numpy()], self.dims, seed, self.reduction, trusted)
            poisoned, suspicion = poisoned_clusters(split, self.size_threshold, self.alpha,
                                                    self.analysis)
            scores[idx] = torch.from_numpy(suspicion[split.assign])
            removed[idx] = torch.from_numpy(poisoned[split.assign])
            silhouettes[c] = round(split.silhouette, 4)
            clean_counts[c] = split.clean_counts.tolist()
            if poisoned.any():
                flagged.append(c)
        figures: dict[str, Any] = {"flagged_classes": flagged, "silhouette": silhouettes}
        if self.analysis == "clean":
            figures["clean_per_cluster"] = clean_counts
        return Sanitized(scores=scores.float(), removed=removed, figures=figures)
