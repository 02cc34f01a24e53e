"""PNG figures for defense results: score histograms and reversed triggers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor


def save_artifacts(folder: Path, artifacts: dict[str, Tensor], result: dict[str, Any]) -> None:
    """`scores` (1-D) becomes scores.png; image tensors [C,H,W] or [K,C,H,W] become grids."""
    if not artifacts:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, value in artifacts.items():
        value = value.detach().float().cpu()
        if value.dim() == 1:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.hist(value.numpy(), bins=50)
            ax.set_xlabel("suspicion score")
            ax.set_ylabel("samples")
            ax.set_title(f"{result.get('defense', '')}: {name}")
        else:
            images = value if value.dim() == 4 else value[None]
            fig, axes = plt.subplots(1, len(images), figsize=(1.2 * len(images), 1.6),
                                     squeeze=False)
            for i, img in enumerate(images):
                img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-8)
                pic = img.permute(1, 2, 0).numpy()
                axes[0][i].imshow(pic[..., 0] if pic.shape[2] == 1 else pic, cmap="gray")
                axes[0][i].set_xticks([])
                axes[0][i].set_yticks([])
                axes[0][i].set_title(str(i), fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
