"""IBD-PSC: triggered inputs keep their confidence when batch-norm parameters are amplified."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from backdoors.defenses.base import DEFENSES, DefenseData, InputDetector
from backdoors.defenses.training import predict
from backdoors.errors import ConfigError


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The model's batch-norm layers in module order (the order the official code scales
    them in, from the last)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def amplified(model: nn.Module, last: int, factor: float) -> nn.Module:
    """A copy of `model` whose last `last` batch-norm layers have their affine weight and
    bias multiplied by `factor` (the input model is left as it was)."""
    twin = copy.deepcopy(model).eval()
    layers = batch_norms(twin)
    with torch.no_grad():
        for bn in layers[len(layers) - last:]:
            if bn.weight is not None:
                bn.weight.mul_(factor)
            if bn.bias is not None:
                bn.bias.mul_(factor)
    return twin


def first_above(errors: list[float], xi: float) -> int | None:
    """1-based position of the first error rate above `xi` (the number of scaled layers at
    which benign accuracy breaks down); None if none is."""
    return next((k for k, e in enumerate(errors, start=1) if e > xi), None)


def confidence_consistency(probs: Tensor, pred: Tensor) -> Tensor:
    """PSC per input: the mean over the amplified models (rows of `probs` [n, N, K]) of the
    probability they give the original model's predicted label `pred` [N]."""
    index = pred.view(1, -1, 1).expand(len(probs), -1, 1)
    return probs.gather(2, index).squeeze(2).mean(0)


def psc_strength(log_probs: Tensor, pred: Tensor) -> Tensor:
    """-log(1 - PSC) per input, from the amplified models' log-probabilities [n, N, K]:
    strictly increasing in PSC, so it ranks inputs as PSC does, but computed in log space
    (1 - p is the sum of the other classes' probabilities), so that inputs the copies are
    all sure of do not tie at PSC = 1 in floating point."""
    others = log_probs.masked_fill(F.one_hot(pred, log_probs.shape[2]).bool()[None],
                                   float("-inf"))
    rest = others.logsumexp(2)  # log(1 - p) of each copy and input
    return math.log(len(log_probs)) - rest.logsumexp(0)


@DEFENSES.register("ibd_psc")
class IbdPsc(InputDetector):
    """IBD-PSC (ICML 2024, arXiv 2405.09786): parameter-oriented scaling consistency.

    Hou, Feng, Hua, Luo, Zhang, Li, "IBD-PSC: Input-level Backdoor Detection via
    Parameter-oriented Scaling Consistency".

    Amplifying the batch-norm parameters (weight and bias) of the last layers of a
    backdoored model by `factor` (default 1.5, the official code's) wrecks its benign
    predictions but leaves triggered inputs confidently on the target class. `fit` picks
    how many layers to scale on the clean budget (the paper's adaptive layer selection):
    counting batch-norm layers from the last, k is the first number of scaled layers at
    which the amplified model's error rate on the clean budget exceeds `xi` (default 0.6);
    the detector then builds `n` (default 5) amplified copies scaling the last k+1, ...,
    k+n layers (as the official code counts them; capped at the number of batch-norm
    layers, so a small model may give fewer distinct copies). PSC: the mean over the
    copies of the softmax probability of the label the original model predicts. Score:
    -log(1 - PSC), the same ranking computed in log space (amplified models are often so
    sure that PSC rounds to exactly 1 for a fifth of clean MNIST inputs and nearly all
    triggered ones, and the ties cost TPR at low FPR); higher = more suspicious. The
    paper's threshold T = 0.9 on PSC is a score of log 10; the runner reports AUROC and
    TPR at 5% FPR instead. Deterministic.

    Needs batch norm: a model without (e.g. simple_net) is refused. Uses the clean budget
    (labels) only for the layer selection. Where no number of scaled layers pushes the
    clean error above `xi` (the official code then fails), all layers but the last are
    taken as k, and `figures["selected"]` says so. The copies are made once in `fit`.
    """

    def __init__(self, n: int = 5, xi: float = 0.6, factor: float = 1.5, **base: Any) -> None:
        super().__init__(**base)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 0.0 <= xi < 1.0:
            raise ValueError(f"xi must be in [0, 1), got {xi}")
        if factor <= 1.0:
            raise ValueError(f"factor must be > 1 (an amplification), got {factor}")
        self.n, self.xi, self.factor = n, xi, factor
        self._copies: list[nn.Module] = []

    def fit(self, model: nn.Module, data: DefenseData) -> None:
        total = len(batch_norms(model))
        if total == 0:
            raise ConfigError(f"ibd_psc scales batch-norm layers, and the model "
                              f"({type(model).__name__}) has none; train the attack with a "
                              "batch-norm model (e.g. resnet18, preact_resnet18, vgg11, "
                              "tiny_cnn)")
        if len(data.clean) == 0:
            raise ValueError("ibd_psc needs a clean budget to select the layers to scale")
        labels = data.clean.labels
        errors: list[float] = []
        start = None
        # The official search: 1 .. total - 1 scaled layers, stopping at the first that
        # breaks clean accuracy.
        for k in data.progress.phase(range(1, total), "selecting the layers to scale"):
            logits, _ = predict(amplified(model, k, self.factor), data.clean, data)
            errors.append(float((logits.argmax(1) != labels).double().mean()))
            start = first_above(errors, self.xi)
            if start is not None:
                break
        found = start is not None
        start = start if start is not None else max(total - 1, 0)
        counts = sorted({min(k, total) for k in range(start + 1, start + self.n + 1)})
        self._copies = [amplified(model, k, self.factor) for k in counts]
        self.figures = {"batch_norm_layers": total, "selected": start if found else None,
                        "scaled_layers": counts, "clean_error_by_layers": errors}

    @torch.no_grad()
    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        if not self._copies:
            raise RuntimeError("call fit(model, data) before score(model, x)")
        was_training = model.training
        model.eval()
        pred = model(x).argmax(1)
        model.train(was_training)
        log_probs = torch.stack([F.log_softmax(c(x).double(), dim=1) for c in self._copies])
        return psc_strength(log_probs, pred).cpu()
