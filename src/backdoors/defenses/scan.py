"""SCAn: representations are a class identity plus a variation shared by all classes; a
backdoor target class holds two identities (its own and the trigger's)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DatasetSanitizer, DefenseData
from backdoors.defenses.mm_bd import signed_index
from backdoors.defenses.results import Sanitized
from backdoors.defenses.robust_stats import covariance
from backdoors.defenses.training import predict

# Convergence tolerance of both EM loops in the authors' code.
TOLERANCE = 1e-5


@dataclass
class GlobalModel:
    """The decomposition r = mu + e fitted on clean data: mu ~ N(0, s_mu) the identity of
    a class, e ~ N(0, s_e) the variation within any class, around the clean mean
    `centre`; `precision` = s_e^-1."""

    s_mu: Tensor
    s_e: Tensor
    precision: Tensor
    centre: Tensor


def identities(x: Tensor, labels: Tensor, num_classes: int, s_mu: Tensor, s_e: Tensor
               ) -> Tensor:
    """Posterior mean of each class's identity given its n_k samples,
    S_mu (n_k S_mu + S_e)^+ sum_k x_i: [num_classes, D]."""
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=num_classes).to(x.dtype)
    systems = counts[:, None, None] * s_mu + s_e
    solved = (torch.linalg.pinv(systems, hermitian=True) @ sums[..., None])[..., 0]
    return solved @ s_mu.T


def fit_global(x: Tensor, labels: Tensor, num_classes: int, iterations: int) -> GlobalModel:
    """SCAn's EM (after Chen et al.'s joint Bayesian model): start from the class means
    and the residuals; then alternately take each class's posterior identity and
    re-estimate S_mu and S_e as the covariances of the identities and of the residuals
    (one row per sample), until both move by less than the tolerance."""
    centre = x.mean(0)
    x = x - centre
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(x.dtype)
    means = torch.zeros(num_classes, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    u = (means / counts[:, None])[labels]
    s_mu, s_e = covariance(u), covariance(x - u)
    for _ in range(iterations):
        u = identities(x, labels, num_classes, s_mu, s_e)[labels]
        new_mu, new_e = covariance(u), covariance(x - u)
        moved = float((new_mu - s_mu).norm() + (new_e - s_e).norm())
        s_mu, s_e = new_mu, new_e
        if moved <= TOLERANCE:
            break
    s_e = shrink(s_e, x - u)
    return GlobalModel(s_mu, s_e, torch.linalg.inv(s_e), centre)


def shrink(s_e: Tensor, residuals: Tensor) -> Tensor:
    """S_e shrunk towards its mean eigenvalue by the Ledoit-Wolf amount for `residuals`.
    A clean budget smaller than the feature dimension leaves S_e singular, and its
    pseudo-inverse (the authors' code) ignores every direction the clean samples do not
    vary in, which is where a trigger's features lie; shrinkage keeps those directions,
    weighted as the rarest variation."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    amount = float(ledoit_wolf_shrinkage(residuals.numpy()))
    scale = float(s_e.trace()) / len(s_e)
    return (1 - amount) * s_e + amount * scale * torch.eye(len(s_e), dtype=s_e.dtype)


def split_two(x: Tensor, precision: Tensor, generator: torch.Generator, iterations: int
              ) -> Tensor:
    """Two subgroups of one class, as SCAn's local model: from a random half split, each
    sample joins the subgroup whose mean is nearer in the variation's metric
    (Mahalanobis with `precision`), until the split stops changing. Membership of the
    first subgroup per sample."""
    member = torch.rand(len(x), generator=generator) >= 0.5
    if bool(member.all()) or not bool(member.any()):
        member[0] = not bool(member[0])  # both subgroups start non-empty (when n > 1)
    for _ in range(iterations):
        if bool(member.all()) or not bool(member.any()):
            break
        u1, u2 = x[member].mean(0), x[~member].mean(0)
        bias = u1 @ precision @ u1 - u2 @ precision @ u2
        new = 2 * (x @ (precision @ (u1 - u2))) > bias
        if torch.equal(new, member) or torch.equal(new, ~member):
            break
        member = new
    return member


def split_statistic(x: Tensor, member: Tensor, model: GlobalModel) -> float:
    """SCAn's test of one class: the mean over its samples of d(x, mu)^2 - d(x, u_c)^2 in
    the variation's metric, mu the class's single posterior identity and u_c the mean of
    the sample's subgroup; twice the mean log likelihood ratio of two identities against
    one. Large when the class holds two populations."""
    n = len(x)
    mu = identities(x, torch.zeros(n, dtype=torch.long), 1, model.s_mu, model.s_e)[0]
    one = x - mu
    if bool(member.all()) or not bool(member.any()):
        return 0.0
    centres = torch.where(member[:, None], x[member].mean(0), x[~member].mean(0))
    two = x - centres
    f = model.precision
    return float((((one @ f) * one).sum(1) - ((two @ f) * two).sum(1)).mean())


def suspicion(x: Tensor, suspicious: Tensor, precision: Tensor) -> Tensor:
    """Posterior probability that each row of x belongs to the `suspicious` subgroup rather
    than the other (equal priors, Gaussians of the variation's covariance around the two
    subgroup means): sigmoid of half the difference of squared distances. 1/2 when a
    subgroup is empty."""
    if bool(suspicious.all()) or not bool(suspicious.any()):
        return torch.full((len(x),), 0.5, dtype=x.dtype)
    d1, d2 = x - x[suspicious].mean(0), x - x[~suspicious].mean(0)
    return torch.sigmoid((((d2 @ precision) * d2).sum(1) - ((d1 @ precision) * d1).sum(1)) / 2)


def nearer_first(points: Tensor, x: Tensor, member: Tensor, precision: Tensor) -> Tensor:
    """Whether each of `points` is nearer (variation metric) the mean of the first
    subgroup of x than of the second; all of them when a subgroup is empty."""
    if bool(member.all()) or not bool(member.any()):
        return torch.full((len(points),), bool(member.any()))
    u1, u2 = x[member].mean(0), x[~member].mean(0)
    d1, d2 = points - u1, points - u2
    return ((d1 @ precision) * d1).sum(1) < ((d2 @ precision) * d2).sum(1)


def _first_suspicious(clean_counts: list[int], member: Tensor) -> bool:
    """Whether the first subgroup is the suspicious one: it holds fewer of the class's
    clean-budget samples, or as many and is not the larger subgroup."""
    first, second = clean_counts
    return first < second or (first == second and int(member.sum()) <= len(member) / 2)


@DEFENSES.register("scan")
class SCAn(DatasetSanitizer):
    """SCAn (USENIX Security 2021, arXiv 1908.00686): a class with two identities.

    Tang, Wang, Zhang, Wang, "Demon in the Variant: Statistical Analysis of DNNs for
    Robust Backdoor Contamination Detection".

    Global model, on the clean budget (`data.clean`): penultimate features
    (`model.features`) decompose as r = mu + e, a class identity mu ~ N(0, S_mu) plus a
    variation e ~ N(0, S_e) shared by all classes, fitted by the paper's EM (at most
    `iterations`, 100, rounds; tolerance 1e-5 as the authors' code). Local model, on each
    label of the training set as received (`data.train`): the class is split into two
    subgroups by EM in S_e's metric (random half start, from the defense generator), and
    the statistic J is twice the mean log likelihood ratio of two identities (the
    subgroup means) against one (the class's posterior identity). The J of all classes are
    normalised to J* = (J - median) / (1.4826 MAD); a class is flagged when J* exceeds
    `threshold` (e^2, the paper's). Its clean-budget samples go to the nearer subgroup;
    the subgroup holding fewer of them is the suspicious one (as the backdoor-toolbox
    port of the authors' code), and the suspicious subgroups of flagged classes are
    removed. Per-sample score: max(J*, 0) of its class plus the posterior probability
    (equal priors) that it belongs to the class's suspicious subgroup, so the poison of a
    strongly split class ranks first, and a poisoned sample the split missed still ranks
    with its class. S_e is shrunk (Ledoit-Wolf) before it is inverted (see `shrink`).

    Deviations: only large J count (the port flags |J - median|, but a class that splits
    less than the others is no sign of poison); both models are centred on the clean mean,
    the prior mean of an identity (the port centres the inspected set on its own mean).
    The one-identity hypothesis uses the class's posterior identity
    S_mu (n S_mu + S_e)^+ sum x, the paper's; the authors' code (and its ports) computes
    S_e (n S_mu + S_e)^+ sum x there, which is sum x minus n times that identity.
    Figures: `statistic` (J per class), `split_index` (J*), `flagged_classes`,
    `clean_per_subgroup`; bar chart `split_index`.
    """

    def __init__(self, threshold: float = math.exp(2), iterations: int = 100,
                 **base: Any) -> None:
        super().__init__(**base)
        if threshold <= 0 or iterations < 1:
            raise ValueError(f"threshold must be > 0 and iterations >= 1, got {threshold} "
                             f"and {iterations}")
        self.threshold, self.iterations = threshold, iterations

    def sanitize(self, model: nn.Module, data: DefenseData) -> Sanitized:
        if data.train is None:
            raise RuntimeError("scan needs the training set")
        clean, clean_labels = predict(model, data.clean, data, model.features)
        features, labels = predict(model, data.train, data, model.features)
        glob = fit_global(clean.flatten(1).double(), clean_labels, data.num_classes,
                          self.iterations)
        x, trusted = features.flatten(1).double() - glob.centre, clean.flatten(1).double()
        trusted = trusted - glob.centre
        stats = torch.zeros(data.num_classes, dtype=torch.float64)
        members: dict[int, Tensor] = {}
        classes = data.progress.phase(labels.unique().tolist(), "splitting each class in two")
        for c in classes:
            idx = (labels == c).nonzero().flatten()
            members[c] = split_two(x[idx], glob.precision, data.generator, self.iterations)
            stats[c] = split_statistic(x[idx], members[c], glob)
        index = signed_index(stats)
        scores = torch.zeros(len(labels), dtype=torch.float64)
        removed = torch.zeros(len(labels), dtype=torch.bool)
        counts: dict[int, list[int]] = {}
        for c, member in members.items():
            idx = (labels == c).nonzero().flatten()
            near = nearer_first(trusted[clean_labels == c], x[idx], member, glob.precision)
            counts[c] = [int(near.sum()), int((~near).sum())]
            suspicious = member if _first_suspicious(counts[c], member) else ~member
            # Classes ordered by how strongly they split, and within a class by membership
            # of the suspicious subgroup (a tie-breaker below 1).
            scores[idx] = float(index[c].clamp(min=0)) + suspicion(x[idx], suspicious,
                                                                  glob.precision)
            removed[idx] = suspicious & bool(index[c] > self.threshold)
        flagged = (index > self.threshold).nonzero().flatten().tolist()
        return Sanitized(scores=scores.float(), removed=removed,
                         figures={"statistic": stats.tolist(), "split_index": index.tolist(),
                                  "flagged_classes": flagged, "clean_per_subgroup": counts},
                         artifacts={"split_index": index.float()})
