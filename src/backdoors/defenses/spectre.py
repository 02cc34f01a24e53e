"""SPECTRE: robust whitening amplifies the spectral signature of poisoned samples, and
QUantum Entropy scores find it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DatasetSanitizer, DefenseData
from backdoors.defenses.results import Sanitized
from backdoors.defenses.robust_stats import (
    covariance,
    inv_sqrt,
    principal_axes,
    que_scores,
    robust_selection,
    shrunk_covariance,
    spectral_excess,
)
from backdoors.defenses.spectral_signatures import top_share
from backdoors.defenses.training import predict

Whiten = Literal["clean", "robust"]
# SPECTRE's code: the robust covariance filter may drop up to LIMIT_FILTER x epsilon
# samples of a class, and the LIMIT_REMOVE x epsilon highest QUE scores are removed.
LIMIT_FILTER, LIMIT_REMOVE = 2.0, 1.5
# The dimensions SPECTRE's code tries when choosing k: round(range(1, 10, 10) .^ 2).
K_GRID = tuple(i * i for i in range(1, 11))
# Fewer clean-budget samples of a class than this cannot estimate a covariance; such a
# class is whitened robustly, as in the paper.
MIN_CLEAN = 3


@dataclass
class ClassFilter:
    """SPECTRE on one class: QUE score per sample, the 1.5 epsilon n_c it removes, the k."""

    scores: Tensor
    removed: Tensor
    k: int


def whiten(proj: Tensor, eps_count: int, tau: float, clean: Tensor | None) -> Tensor:
    """The class's PCA coordinates [n, k] whitened. With `clean` (the class's clean-budget
    coordinates) by their mean and shrunk covariance; otherwise as the paper, by the
    covariance of the subset the covariance filter keeps (it drops at most 2 eps_count)."""
    if clean is not None and len(clean) >= MIN_CLEAN:
        return (proj - clean.mean(0)) @ inv_sqrt(shrunk_covariance(clean))
    n = len(proj)
    kept = robust_selection(proj, max(eps_count, 1) / n, tau, round(LIMIT_FILTER * eps_count))
    return proj @ inv_sqrt(covariance(proj[kept], unbiased=False))


def quantum_filter(proj: Tensor, eps_count: int, alpha: float, tau: float,
                   clean: Tensor | None = None) -> ClassFilter:
    """QUE scores of one class's whitened PCA coordinates; the 1.5 eps_count highest are
    removed."""
    scores = que_scores(whiten(proj, eps_count, tau, clean), alpha)
    removed = torch.zeros(len(scores), dtype=torch.bool)
    removed[scores.topk(min(len(scores), round(LIMIT_REMOVE * eps_count))).indices] = True
    return ClassFilter(scores, removed, proj.shape[1])


def spectre_class(features: Tensor, eps_count: int, k: int | None, alpha: float,
                  tau: float, clean: Tensor | None = None) -> ClassFilter:
    """SPECTRE on the features [n, D] of one class (`clean`: its clean-budget features, to
    whiten with; None: robust whitening). With k None, the paper's choice of k: every k
    of K_GRID (up to the rank) is tried and the one whose kept samples leave the largest
    QUE-weighted variance excess in the top-100 PCA space wins."""
    mean, axes = principal_axes(features, max(K_GRID) if k is None else k)
    full = (features - mean) @ axes
    trusted = None if clean is None else (clean - mean) @ axes
    if k is not None:
        return quantum_filter(full, eps_count, alpha, tau, trusted)
    best, best_excess = None, -float("inf")
    for dims in sorted({min(g, full.shape[1]) for g in K_GRID}):
        found = quantum_filter(full[:, :dims], eps_count, alpha, tau,
                               None if trusted is None else trusted[:, :dims])
        excess = spectral_excess(full, ~found.removed, alpha)
        if excess > best_excess:
            best, best_excess = found, excess
    assert best is not None  # K_GRID is not empty
    return best


@DEFENSES.register("spectre")
class Spectre(DatasetSanitizer):
    """SPECTRE (ICML 2021, arXiv 2104.11315): whitening, then QUantum Entropy scores.

    Hayase, Kong, Somani, Oh, "SPECTRE: Defending Against Backdoor Attacks Using Robust
    Statistics".

    For each label of the training set as received (`data.train`, poisoned labels
    included), the penultimate features (`model.features`) are projected on the class's
    top k principal directions and whitened, so clean samples look isotropic and the
    poison's direction stands out; each sample is scored by QUE, x' M x with
    M = exp(`alpha` (S - I) / (||S|| - 1)) normalised to unit trace (S: covariance of the
    class's whitened points), which weighs every direction by its excess variance.

    `whiten: robust` is the paper's: the covariance of the subset kept by the covariance
    filter of Diakonikolas et al. (2017), run as SPECTRE's code runs it (rounds that drop
    points of too large a fourth moment along the worst direction, until the rest pass as
    Gaussian or 2 epsilon n_c points are gone; n_c the class's size), and the 1.5 epsilon
    n_c highest scores of every class are removed. Robust estimates need a clean majority:
    10% dirty-label poisoning of ten balanced classes makes the target class about half
    poison, the filter cannot tell which half is clean, and the poison is whitened away
    with the rest (docs/defenses.md has the figures). `whiten: clean` (default) takes
    the mean and (Ledoit-Wolf shrunk) covariance of the class's clean-budget samples as the
    robust estimate, as `spectral_signatures` takes its centre: the poison stays the
    outlier whatever its share, a clean sample scores about 1 in every class, and the
    1.5 epsilon N highest scores over all classes are removed.
    Classes with fewer than 3 clean-budget samples are whitened robustly.

    Options: `epsilon` (0.1), the defender's upper bound on the poisoned share (of each
    class for `robust`; of the training set for `clean`); the paper's epsilon is a count,
    the true number of poisons in its experiments (at most 10% of the target class);
    `k` (null), the PCA dimension, null for the paper's automatic choice among
    1, 4, 9, ..., 100 (the k whose kept samples leave the largest QUE-weighted variance
    excess); `alpha` (4) and `tau` (0.1), the QUE and filter parameters of the code.

    Deviations: the code skips robust whitening for k = 1 and scores raw squared
    projections; here k = 1 goes through the same steps, so scores of every class and k
    share one scale and one AUROC over the whole set means something.
    Scores: log(1 + QUE score) (a monotone transform, for a readable histogram).
    Figures: `k` (per class). Artifacts: `k` (bars).
    """

    def __init__(self, epsilon: float = 0.1, k: int | None = None, alpha: float = 4.0,
                 tau: float = 0.1, whiten: Whiten = "clean", **base: Any) -> None:
        super().__init__(**base)
        if not 0.0 < epsilon < 0.5:
            raise ValueError(f"epsilon must be in (0, 0.5): robust estimates need a clean "
                             f"majority (the filter may drop 2 epsilon), got {epsilon}")
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1 or null (automatic), got {k}")
        if alpha <= 0 or not 0.0 < tau < 1.0:
            raise ValueError(f"alpha must be > 0 and tau in (0, 1), got {alpha} and {tau}")
        self.epsilon, self.k, self.alpha, self.tau = epsilon, k, alpha, tau
        self.whiten = whiten

    def sanitize(self, model: nn.Module, data: DefenseData) -> Sanitized:
        if data.train is None:
            raise RuntimeError("spectre needs the training set")
        features, labels = predict(model, data.train, data, model.features)
        features = features.flatten(1).double()
        clean, clean_labels = predict(model, data.clean, data, model.features)
        clean = clean.flatten(1).double()
        scores = torch.zeros(len(labels), dtype=torch.float64)
        removed = torch.zeros(len(labels), dtype=torch.bool)
        chosen = torch.zeros(data.num_classes)
        for c in data.progress.phase(labels.unique().tolist(), "scoring each class"):
            idx = (labels == c).nonzero().flatten()
            if len(idx) < 3:
                continue  # too few samples for a covariance
            trusted = clean[clean_labels == c] if self.whiten == "clean" else None
            found = spectre_class(features[idx], round(self.epsilon * len(idx)), self.k,
                                  self.alpha, self.tau, trusted)
            scores[idx], removed[idx], chosen[c] = found.scores, found.removed, found.k
        if self.whiten == "clean":  # scores compare across classes: one global budget
            removed = top_share(scores, LIMIT_REMOVE * self.epsilon)
        # log(1 + QUE): the same ranking, and a histogram whose long tail stays readable.
        return Sanitized(scores=scores.log1p().float(), removed=removed,
                         figures={"k": chosen.int().tolist()}, artifacts={"k": chosen})
