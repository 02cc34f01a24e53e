"""Beatrix: triggered inputs have feature correlations (Gram matrices) no clean input has."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, InputDetector
from backdoors.defenses.layers import capture, stage_outputs
from backdoors.errors import ConfigError

EPS = 1e-6  # the official code's guard against bounds at zero


def gram_features(fmap: Tensor, order: int) -> Tensor:
    """Beatrix's p-th order Gram features of feature maps [N, C, h, w]: G = F^p (F^p)^T
    over the h*w positions, then sign(G) |G|^(1/p) (back to the scale of p = 1); the
    upper triangle with the diagonal, [N, C (C + 1) / 2], in float64 (high powers)."""
    f = fmap.double().flatten(2) ** order
    gram = f @ f.transpose(1, 2)
    gram = gram.sign() * gram.abs() ** (1.0 / order)
    rows, cols = torch.triu_indices(gram.shape[1], gram.shape[2], device=gram.device)
    return gram[:, rows, cols]


def median_mad(values: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Along `dim`: the median and the median absolute deviation from it (the lower middle
    value for an even count, as torch.median and the official code)."""
    median = values.median(dim, keepdim=True).values
    mad = (values - median).abs().median(dim, keepdim=True).values
    return median.squeeze(dim), mad.squeeze(dim)


def deviation(g: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """How far Gram features [..., D] fall outside [low, high] (same shape, or
    broadcastable), each entry relative to the bound it crosses, averaged over the D
    entries."""
    below = (low - g).clamp(min=0) / (low + EPS).abs()
    above = (g - high).clamp(min=0) / (high + EPS).abs()
    return (below + above).mean(-1)


@DEFENSES.register("beatrix")
class Beatrix(InputDetector):
    """Beatrix (NDSS 2023, arXiv 2209.11715): Gram-matrix deviations of a feature layer.

    Ma, Wang, Sun, Xue, Wen, Xiang, "The Beatrix Resurrections: Robust Backdoor Detection
    via Gram Matrices".

    A trigger makes the model's intermediate features co-activate in ways no clean input
    of the target class does; Beatrix captures these correlations with Gram matrices of
    orders 1..p. For the feature maps F of one layer, the order-p feature is the upper
    triangle of sign(G) |G|^(1/p) with G = F^p (F^p)^T. `fit` groups the clean budget by
    the model's prediction and keeps, per class, order and entry, the range median +/-
    `k` * MAD (robust statistics, the paper's improvement over Gram-matrix OOD detection's
    min/max). Score: the input's deviation from the range of its predicted class, each
    entry outside it counted relative to the crossed bound, averaged over entries and
    orders (higher = more suspicious). The paper then thresholds at the 95th percentile of
    clean deviations; the runner reports AUROC and TPR at 5% FPR instead.

    `orders` (default 1..8) and `k` (10) are the official code's. `layer` names the
    module whose output is used; by default the input of the model's last resolution
    stage (the output of the one before, from `layers.stage_outputs`: layer4's input for
    the ResNets, as the official code hooks; simple_net's first conv block), or the only
    stage of a one-stage model. A class with fewer than `min_class_samples` (default 5)
    clean images predicted as it takes the ranges of the whole budget. The official code
    divides the sum over entries by C^2/2 (it keeps the zeroed lower triangle); the mean
    over the C(C+1)/2 entries here differs by a constant factor. Needs the clean budget.
    """

    def __init__(self, orders: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), k: float = 10.0,
                 layer: str | None = None, min_class_samples: int = 5, **base: Any) -> None:
        super().__init__(**base)
        orders = tuple(orders)
        if not orders or any(not isinstance(p, int) or p < 1 for p in orders):
            raise ValueError(f"orders must be a non-empty list of integers >= 1, got {orders}")
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        if min_class_samples < 1:
            raise ValueError(f"min_class_samples must be >= 1, got {min_class_samples}")
        self.orders, self.k, self.layer = orders, k, layer
        self.min_class_samples = min_class_samples
        self._module: nn.Module | None = None
        self._bounds: tuple[Tensor, Tensor] | None = None  # (low, high) [K, P, D]

    def _find(self, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, nn.Module]:
        modules = dict(model.named_modules())
        if self.layer is not None:
            if self.layer not in modules:
                raise ConfigError(f"beatrix: the model has no module '{self.layer}'")
            return self.layer, modules[self.layer]
        stages = stage_outputs(model, input_shape)
        if not stages:
            raise ConfigError("beatrix: found no convolutional feature map; name one with "
                              "`layer`")
        return stages[-2] if len(stages) > 1 else stages[0]

    @torch.no_grad()
    def features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(Gram features [P, N, D] of the chosen layer, predicted label [N])."""
        was_training = model.training
        model.eval()
        with capture([self._module]) as outputs:
            pred = model(x).argmax(1)
        model.train(was_training)
        if outputs[0].dim() != 4:
            raise ConfigError(f"beatrix needs a feature map [N, C, h, w]; the chosen layer "
                              f"gives shape {tuple(outputs[0].shape)}")
        return torch.stack([gram_features(outputs[0], p) for p in self.orders]), pred

    def _range(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """(low, high) [P, D]: median -/+ k MAD over the samples of g [P, N, D]."""
        median, mad = median_mad(g, dim=1)
        return median - self.k * mad, median + self.k * mad

    def fit(self, model: nn.Module, data: DefenseData) -> None:
        name, self._module = self._find(model, data.input_shape)
        images = data.clean.images.float().div(255)
        parts = [self.features(model, images[i:i + data.batch_size].to(data.device))
                 for i in range(0, len(images), data.batch_size)]
        g = torch.cat([p[0] for p in parts], 1)
        pred = torch.cat([p[1] for p in parts])
        pooled = self._range(g)
        ranges = [self._range(g[:, pred == c])
                  if int((pred == c).sum()) >= self.min_class_samples else pooled
                  for c in range(data.num_classes)]
        self._bounds = (torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges]))
        self.figures = {"layer": name, "feature_dim": int(g.shape[2]),
                        "class_counts": torch.bincount(pred.cpu(),
                                                       minlength=data.num_classes).tolist()}

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        if self._bounds is None:
            raise RuntimeError("call fit(model, data) before score(model, x)")
        g, pred = self.features(model, x)
        low, high = (b[pred].transpose(0, 1) for b in self._bounds)  # [P, N, D]
        return deviation(g, low, high).mean(0).float().cpu()
