"""PNG figures for defense results: score histograms, per-class bars, reversed triggers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Axis labels of the per-index (bar) figures defenses report.
BARS = {"mask_norms": ("class", "reversed trigger mask L1 norm"),
        "pruning_curve": ("neurons pruned", "clean-budget accuracy"),
        "margins": ("class", "maximum logit margin"),
        "split_index": ("class", "SCAn J*"),
        "k": ("class", "PCA dimension"),
        "poisoned_in_clean_pool": ("epoch", "poisoned samples in the trusted pool")}


def save_artifacts(folder: Path, artifacts: dict[str, Tensor], result: dict[str, Any]) -> None:
    """`scores` (1-D suspicion per sample) becomes scores.png, a histogram split by
    `positive` (triggered or poisoned) when the runner knows it; 1-D tensors named
    `*_curve` become line plots, other 1-D tensors bar charts; image tensors [C,H,W] or
    [K,C,H,W] become grids."""
    drawable = {k: v for k, v in artifacts.items() if k != "positive"}
    if not drawable:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name, value in drawable.items():
        value = value.detach().float().cpu()
        if name == "scores":
            fig = _histogram(plt, value, artifacts.get("positive"), result)
        elif value.dim() == 1 and name.endswith("_curve"):
            fig = _curve(plt, name, value, result)
        elif value.dim() == 1:
            fig = _bars(plt, name, value, result)
        else:
            fig = _grid(plt, value)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)


def _histogram(plt: Any, scores: Tensor, positive: Tensor | None, result: dict[str, Any]
               ) -> Any:
    fig, ax = plt.subplots(figsize=(5, 3))
    if positive is not None and len(positive) == len(scores) and bool(positive.any()):
        positive = positive.bool().cpu()
        label = "triggered" if result.get("stage") == "input" else "poisoned"
        # Shared bin edges: a tight cluster of poisoned scores stays visible beside the
        # clean spread instead of shrinking to hair-thin bars of its own binning.
        finite = scores[torch.isfinite(scores)]
        edges = torch.histogram(finite, bins=50).bin_edges.numpy() if len(finite) else 50
        ax.hist(scores[~positive].numpy(), bins=edges, alpha=0.6, label="clean")
        ax.hist(scores[positive].numpy(), bins=edges, alpha=0.6, label=label)
        ax.legend()
    else:
        ax.hist(scores.numpy(), bins=50)
    ax.set_xlabel("suspicion score")
    ax.set_ylabel("samples")
    ax.set_title(f"{result.get('defense', '')}: scores")
    return fig


def _bars(plt: Any, name: str, value: Tensor, result: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(value)), value.numpy())
    x_label, y_label = BARS.get(name, ("index", name))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{result.get('defense', '')}: {name}")
    return fig


def _curve(plt: Any, name: str, value: Tensor, result: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(value) + 1), value.numpy())
    x_label, y_label = BARS.get(name, ("step", name))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{result.get('defense', '')}: {name.replace('_', ' ')}")
    return fig


def _grid(plt: Any, value: Tensor) -> Any:
    images = value if value.dim() == 4 else value[None]
    fig, axes = plt.subplots(1, len(images), figsize=(1.2 * len(images), 1.6), squeeze=False)
    for i, img in enumerate(images):
        img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-8)
        pic = img.permute(1, 2, 0).numpy()
        axes[0][i].imshow(pic[..., 0] if pic.shape[2] == 1 else pic, cmap="gray")
        axes[0][i].set_xticks([])
        axes[0][i].set_yticks([])
        axes[0][i].set_title(str(i), fontsize=7)
    return fig
