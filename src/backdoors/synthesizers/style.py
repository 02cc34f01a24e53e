"""Writing or photographic styles within a class, found by k-means on pixels.

A semantic backdoor needs a natural feature that some inputs of a class carry and others
do not. Subpopulation poisoning (Jagielski et al., "Subpopulation Data Poisoning
Attacks", arXiv 2006.14026) defines such groups by clustering; here the clusters are
k-means on 2x2-average-pooled pixels, which on MNIST separates ways of writing a digit
(slanted, upright, crossed sevens ...). Clusters are numbered by size, largest first, so
a config can name one without knowing k-means' arbitrary labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def style_features(images: Tensor) -> np.ndarray:
    """uint8 images [N, C, H, W] -> float features [N, D]: pixels in [0, 1], 2x2-average
    pooled when the images are at least 16 pixels wide (pooling tolerates one-pixel shifts
    of the stroke; tiny images keep every pixel)."""
    x = images.float().div(255.0)
    if x.shape[-1] >= 16:
        x = torch.nn.functional.avg_pool2d(x, 2)
    return x.flatten(1).numpy()


class StyleClusters:
    """k-means centres of one class's images, ranked by cluster size (largest first)."""

    def __init__(self, images: Tensor, k: int, seed: int) -> None:
        from sklearn.cluster import KMeans  # heavy import, only for this predicate

        if len(images) < k:
            raise ValueError(f"{k} style clusters need at least {k} images, got {len(images)}")
        fit = KMeans(k, n_init=10, random_state=seed).fit(style_features(images))
        order = np.argsort(-np.bincount(fit.labels_, minlength=k), kind="stable")
        self.centres = fit.cluster_centers_[order]

    def assign(self, images: Tensor) -> Tensor:
        """Index of the nearest centre (by size rank) for each uint8 image."""
        feats = style_features(images)
        dist = ((feats[:, None, :] - self.centres[None]) ** 2).sum(-1)
        return torch.from_numpy(dist.argmin(1))
