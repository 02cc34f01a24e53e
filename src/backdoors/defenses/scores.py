"""Pure maths for judging defenses: detection scores, anomaly index, DER."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# 1.4826 makes the median absolute deviation a consistent estimator of the standard
# deviation under normality (Neural Cleanse, Wang et al., S&P 2019).
MAD_CONSISTENCY = 1.4826


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties
    counting one half (the Mann-Whitney U statistic). NaN without both classes."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks, ties sharing their mean rank."""
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).to(x.dtype)
    mean_rank = ends - (counts.to(x.dtype) - 1) / 2
    ranks[order] = mean_rank[inverse]
    return ranks


def tpr_at_fpr(scores: Tensor, positive: Tensor, fpr: float = 0.05) -> float:
    """True-positive rate at the threshold that flags at most `fpr` of the negatives
    (higher score = more suspicious)."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    neg = scores[~positive].sort(descending=True).values
    if len(neg) == 0 or int(positive.sum()) == 0:
        return float("nan")
    allowed = int(fpr * len(neg))
    # Flag scores strictly above the (allowed+1)-th highest negative.
    threshold = neg[allowed] if allowed < len(neg) else neg[-1] - 1
    return float((scores[positive] > threshold).double().mean())


def anomaly_index(values: Tensor) -> Tensor:
    """|x - median| / (1.4826 * MAD) per entry; Neural Cleanse flags classes whose trigger
    norm is small with index > 2."""
    values = values.double()
    # quantile(0.5) averages the two middle values for an even count (torch.median
    # takes the lower one), as the Neural Cleanse reference does.
    median = values.quantile(0.5)
    mad = MAD_CONSISTENCY * (values - median).abs().quantile(0.5)
    return (values - median).abs() / mad.clamp(min=1e-12)


def der(acc_before: float, acc_after: float, asr_before: float, asr_after: float) -> float:
    """Defense effectiveness rating (BackdoorBench, arXiv 2206.12654):
    (max(0, ASR drop) - max(0, accuracy drop) + 1) / 2, in [0, 1]; 0.5 = no effect."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2


def format_result(result: dict[str, Any]) -> str:
    """One readable line of a defense's headline figures."""
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    parts = [f"{result['defense']} ({result['stage']})"]
    if "auroc" in result:
        parts.append(f"AUROC {result['auroc']:.3f}, TPR@5%FPR {pct(result['tpr_at_5_fpr'])}")
    for key in ("removed", "isolated"):
        if key in result:
            parts.append(f"{key} {result[key]} (recall {pct(result[f'{key}_recall'])}, "
                         f"precision {pct(result[f'{key}_precision'])})")
    if "flagged_classes" in result:
        parts.append(f"flagged classes {result['flagged_classes']}")
    if "after" in result:
        b, a = result["before"], result["after"]
        parts.append(f"clean {pct(b['clean_accuracy'])} -> {pct(a['clean_accuracy'])}, "
                     f"ASR {pct(b['asr'])} -> {pct(a['asr'])}, DER {result['der']:.3f}")
    parts.append(f"{result['seconds']:.1f}s")
    return " | ".join(parts)
