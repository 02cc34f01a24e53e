"""Robust statistics for SPECTRE: PCA, the covariance filter of Diakonikolas, Kamath, Kane,
Li, Moitra and Stewart (ICML 2017, "Being Robust (in High Dimensions) Can Be Practical",
arXiv 1703.00893) as SPECTRE's code runs it, and QUantum Entropy (QUE) scores of Dong,
Hopkins and Li (NeurIPS 2019, arXiv 1906.11366). Pure maths on [n, d] float64 tensors,
one row per sample."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Constants of the filter in SPECTRE's code (dkk17.jl): C scales the early-filter radius
# and the stopping test, SHIFT is subtracted from a deviation to give the threshold.
FILTER_C = 10.0
SHIFT = 3.0
# Directions whose singular value is below this share of the largest carry no variance
# (dead ReLU units): PCA does not return them, so whitening never divides by ~0.
RANK_TOL = 1e-6


def principal_axes(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The mean [D] of the rows of x and their top k' principal directions [D, k'];
    k' = k or fewer when x has lower rank. Coordinates: (x - mean) @ axes."""
    mean = x.mean(0)
    _, sv, vh = torch.linalg.svd(x - mean, full_matrices=False)
    rank = int((sv > RANK_TOL * sv[0]).sum()) if len(sv) and sv[0] > 0 else 0
    return mean, vh[: max(1, min(k, rank))].T


def pca(x: Tensor, k: int) -> Tensor:
    """Coordinates [n, k'] of the rows of x, centred on their mean, on their top k'
    principal directions (principal_axes)."""
    mean, axes = principal_axes(x, k)
    return (x - mean) @ axes


def covariance(x: Tensor, unbiased: bool = True) -> Tensor:
    """Sample covariance of the rows of x (divided by n - 1, or by n)."""
    centred = x - x.mean(0, keepdim=True)
    return centred.T @ centred / max(1, len(x) - int(unbiased))


def shrunk_covariance(x: Tensor) -> Tensor:
    """Ledoit-Wolf covariance of the rows of x (shrunk towards a scaled identity): stable
    for a few dozen samples in many dimensions."""
    from sklearn.covariance import ledoit_wolf

    return torch.from_numpy(ledoit_wolf(x.numpy())[0]).to(x.dtype)


def inv_sqrt(sym: Tensor) -> Tensor:
    """Sigma^(-1/2) of a symmetric positive semi-definite matrix (eigenvalues floored at
    RANK_TOL^2 of the largest so a flat direction cannot blow up)."""
    vals, vecs = torch.linalg.eigh(sym)
    floor = max(float(vals[-1]), 1e-300) * RANK_TOL**2
    return vecs @ torch.diag(vals.clamp(min=floor).rsqrt()) @ vecs.T


def fourth_moment_top(y: Tensor, start: Tensor | None = None) -> tuple[float, Tensor]:
    """Top eigenvalue and eigenvector (a d x d matrix of unit Frobenius norm) of the
    operator T(V) = mean_i (y_i' V y_i) y_i y_i' - tr(V) I on d x d matrices: the
    fourth moment of whitened points minus that of the identity; about 2 in every
    direction for Gaussian data. Matrix-free Lanczos (ARPACK), started from `start` (the
    previous round's eigenvector: fewer products) or from all ones as SPECTRE's code, so
    it is deterministic; relative accuracy 1e-8."""
    n, d = y.shape
    if d == 1:
        return float((y**4).mean() - 1.0), torch.ones(1, 1, dtype=y.dtype)
    from scipy.sparse.linalg import LinearOperator, eigsh

    eye = torch.eye(d, dtype=y.dtype)

    def apply(flat: np.ndarray) -> np.ndarray:
        # torch, not numpy: it keeps to the intra-op thread count (numpy's BLAS threads
        # made each product a hundred times slower on a busy machine).
        v = torch.from_numpy(flat).reshape(d, d).to(y.dtype)
        weights = ((y @ v) * y).sum(1) / n
        return ((y * weights[:, None]).T @ y - v.trace() * eye).reshape(-1).numpy()

    op = LinearOperator((d * d, d * d), matvec=apply, dtype=np.float64)
    v0 = np.ones(d * d) if start is None else start.reshape(-1).numpy()
    vals, vecs = eigsh(op, k=1, which="LA", v0=v0, tol=1e-8)
    return float(vals[0]), torch.from_numpy(vecs[:, 0].reshape(d, d).copy())


def keep_lowest(keep: Tensor, badness: Tensor, limit: int) -> Tensor:
    """`keep`, widened so at most `limit` points are dropped: the n - limit points of
    lowest badness are always kept (ties kept together)."""
    n = len(badness)
    if limit >= n:
        return keep
    cut = badness.sort().values[n - limit - 1]
    return keep | (badness <= cut)


def filter_threshold(diffs: Tensor, eps: float) -> float | None:
    """The deviation above which points are dropped: the first sorted deviation D (rank
    i of n) with T = D - SHIFT > 0 and i / n >= tail(T), where tail(T) = 1 up to
    10 log(1/eps) and 3 eps / (T log T)^2 beyond (SPECTRE's code); None if none."""
    ordered = diffs.sort().values
    n = len(ordered)
    t = ordered - SHIFT
    rank = torch.arange(1, n + 1, dtype=t.dtype) / n
    tail = torch.ones_like(t)
    far = t > 10 * math.log(1 / eps)
    tail[far] = 3 * eps / (t[far] * t[far].log()) ** 2
    ok = (t > 0) & (rank >= tail)
    return float(t[ok.nonzero()[0, 0]]) if bool(ok.any()) else None


def covariance_filter(s: Tensor, eps: float, tau: float, limit: int,
                      start: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """One round of the DKK17 covariance filter on the rows of s: the mask of points to
    keep (at most `limit` dropped), or None when the points pass as Gaussian or no
    threshold is found (the filter stops); and the worst direction found (a d x d
    matrix, to start the next round's eigensolver from; None after an early filter)."""
    n, d = s.shape
    y = s @ inv_sqrt(s.T @ s / n)  # whitened by the second moment, as the code
    norms = (y * y).sum(1)
    far = norms >= FILTER_C * d * math.log(n / tau)
    if bool(far.any()):  # early filter: points far outside the Gaussian's shell
        return keep_lowest(~far, norms, limit), start
    lam, v = fourth_moment_top(y, start)
    if lam <= 1 + FILTER_C * eps * math.log(1 / eps) ** 2:
        return None, v
    sym = (v + v.T) / 2
    p = (((y @ sym) * y).sum(1) - sym.trace()) / math.sqrt(2)
    diffs = (p - p.quantile(0.5)).abs()
    threshold = filter_threshold(diffs, eps)
    if threshold is None:
        return None, v
    return keep_lowest(diffs <= threshold, diffs, limit), v


def robust_selection(s: Tensor, eps: float, tau: float, limit: int) -> Tensor:
    """Rounds of the covariance filter until it stops or `limit` points are dropped;
    the mask of the points kept."""
    kept, direction = torch.arange(len(s)), None
    while limit > 0:
        keep, direction = covariance_filter(s[kept], eps, tau, limit, direction)
        dropped = 0 if keep is None else int((~keep).sum())
        if keep is None or dropped == 0:
            break
        kept, limit = kept[keep], limit - dropped
    mask = torch.zeros(len(s), dtype=torch.bool)
    mask[kept] = True
    return mask


def que_matrix(sigma: Tensor, alpha: float) -> Tensor:
    """exp(alpha (Sigma - I) / (||Sigma||_2 - 1)) normalised to unit trace: the QUE
    weighting of directions by how much their variance exceeds 1. When no direction does
    (||Sigma||_2 <= 1) all directions weigh alike."""
    vals, vecs = torch.linalg.eigh(sigma)
    top = float(vals[-1])
    if top <= 1.0:
        weights = torch.ones_like(vals)
    else:
        weights = torch.exp(alpha * (vals - 1) / (top - 1) - alpha)  # / e^alpha: no overflow
    weights = weights / weights.sum()
    return vecs @ torch.diag(weights) @ vecs.T


def que_scores(white: Tensor, alpha: float) -> Tensor:
    """QUE score x' M x per whitened point, M = que_matrix of their covariance."""
    m = que_matrix(covariance(white), alpha)
    return ((white @ m) * white).sum(1)


def spectral_excess(full: Tensor, kept: Tensor, alpha: float) -> float:
    """How much variance the points still show beyond the kept ones' covariance: all
    points whitened by the covariance of those kept, then the QUE-weighted mean eigenvalue
    tr(Sigma' M) of their covariance Sigma'. SPECTRE picks the k that maximises it."""
    white = full @ inv_sqrt(covariance(full[kept]))
    sigma = covariance(white)
    return float((sigma @ que_matrix(sigma, alpha)).trace())
