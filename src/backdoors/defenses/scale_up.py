"""SCALE-UP: triggered inputs keep their prediction when every pixel value is amplified."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, InputDetector
from backdoors.defenses.training import predict

# SPC takes values in steps of 1 / len(scales); a class whose clean-budget SPC values are
# all equal has standard deviation 0, and dividing by it would turn ties into infinities.
MIN_STD = 1e-3


def amplify(x: Tensor, factor: float) -> Tensor:
    """SCALE-UP's pixel-wise amplification: every pixel value times `factor`, clipped to
    the valid range [0, 1]."""
    return (x * factor).clamp(0.0, 1.0)


def consistency(scaled_preds: Tensor, reference: Tensor) -> Tensor:
    """Scaled prediction consistency: the share of the amplified copies (rows of
    `scaled_preds` [S, N]) whose predicted label is the input's `reference` label [N]."""
    return (scaled_preds == reference[None]).double().mean(0)


def class_statistics(spc: Tensor, labels: Tensor, num_classes: int
                     ) -> tuple[Tensor, Tensor]:
    """(mean [K], standard deviation [K]) of the SPC values of each class; a class with
    fewer than two samples takes the statistics of all samples (no spread to estimate)."""
    spc = spc.double()
    overall_std = spc.std() if len(spc) > 1 else spc.new_tensor(0.0)
    mean = spc.mean().expand(num_classes).clone()
    std = overall_std.expand(num_classes).clone()
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, dtype=spc.dtype).index_add_(0, labels, spc)
    squares = torch.zeros(num_classes, dtype=spc.dtype).index_add_(0, labels, spc**2)
    enough = counts >= 2
    n = counts.clamp(min=2).double()
    class_mean = sums / counts.clamp(min=1)
    class_var = (squares - n * class_mean**2).clamp(min=0) / (n - 1)  # unbiased, as torch.std
    mean[enough] = class_mean[enough]
    std[enough] = class_var[enough].sqrt()
    return mean, std


def standardize(spc: Tensor, pred: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """The data-limited SPC: (SPC - mean of the predicted class) / its standard deviation."""
    return (spc.double() - mean[pred]) / std[pred].clamp(min=MIN_STD)


@DEFENSES.register("scale_up")
class ScaleUp(InputDetector):
    """SCALE-UP (ICLR 2023, arXiv 2302.03251): scaled prediction consistency.

    Guo, Li, Chen, Guo, Sun, Liu, "SCALE-UP: An Efficient Black-box Input-level Backdoor
    Detection via Analyzing Scaled Prediction Consistency".

    Each input x is amplified to clip(n * x, 0, 1) for every factor n of `scales`
    (default 3, 5, 7, 9, 11: the official code's set); its SPC is the share of amplified
    copies the model still assigns x's predicted label. A trigger's features survive the
    amplification, so triggered inputs keep their (target) label and score high, while
    benign images drift to other classes. Labels only: the model is queried as a black box.

    `data_limited` (default true, the paper's data-limited variant) uses the clean budget:
    `fit` computes the SPC of every clean image and the mean and standard deviation of
    the values of each class (grouped by the model's prediction, the label SPC refers to),
    and an input's score is its SPC standardised with the statistics of its predicted
    class (a class with fewer than two clean images takes those of the whole budget; a
    zero spread is floored at 1e-3). False: the raw SPC (the data-free variant; `fit`
    does nothing). The paper then flags scores above a threshold T; the runner reports
    AUROC and TPR at 5% FPR over the raw scores instead. Deterministic (no randomness).

    Known weakness (the paper's and IBD-PSC's): pixels already at 0 or 1 do not change
    under amplification, so on near-binary images such as MNIST benign digits also keep
    their label and the scores of clean and triggered inputs overlap.
    """

    def __init__(self, scales: Sequence[float] = (3.0, 5.0, 7.0, 9.0, 11.0),
                 data_limited: bool = True, **base: Any) -> None:
        super().__init__(**base)
        scales = tuple(float(s) for s in scales)
        if not scales or any(s <= 1.0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of factors > 1, got {scales}")
        self.scales, self.data_limited = scales, data_limited
        self._stats: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def spc(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(SPC [N], predicted label [N]) of the pixel batch x."""
        was_training = model.training
        model.eval()
        pred = model(x).argmax(1)
        # One pass over all amplified copies; the batches here are test batches, so S x N
        # stays a few thousand images at most.
        copies = torch.cat([amplify(x, s) for s in self.scales])
        scaled = model(copies).argmax(1).view(len(self.scales), len(x))
        model.train(was_training)
        return consistency(scaled, pred).cpu(), pred.cpu()

    def fit(self, model: nn.Module, data: DefenseData) -> None:
        if not self.data_limited:
            return
        if len(data.clean) == 0:
            raise ValueError("scale_up with data_limited needs a clean budget; set "
                             "data_limited: false for the data-free variant")
        both, _ = predict(model, data.clean, data,
                          lambda x: torch.stack([t.double() for t in self.spc(model, x)], 1))
        values, pred = both[:, 0], both[:, 1].long()
        self._stats = class_statistics(values, pred, data.num_classes)
        self.figures = {"clean_spc_mean": float(values.mean()),
                        "class_spc_mean": self._stats[0].tolist(),
                        "class_spc_std": self._stats[1].tolist()}

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        spc, pred = self.spc(model, x)
        if not self.data_limited:
            return spc.float()
        if self._stats is None:
            raise RuntimeError("call fit(model, data) before score(model, x)")
        return standardize(spc, pred, *self._stats).float()
