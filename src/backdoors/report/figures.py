"""Report figures as PNG bytes: attack x defense heatmaps, training curves and detection
histograms (matplotlib, headless)."""

from __future__ import annotations

import io
import math
from typing import Any

from safetensors.torch import load_file

from backdoors.report.collect import Record
from backdoors.report.tables import Table

MAX_PANELS = 12  # detection histograms: rows drawn per defense


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    _plt().close(fig)
    return buffer.getvalue()


def heatmap(table: Table, labels: dict[str, str], cmap: str) -> bytes:
    """The table's means, rows x columns, annotated; blank where there is no value."""
    plt = _plt()
    values = [[math.nan if (e := table.cells.get((r, c))) is None else table.scale * e.mean
               for c in table.columns] for r in table.rows]
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(table.columns),
                                    2.4 + 0.45 * len(table.rows)))
    top = 100 if table.scale == 100 else max((v for r in values for v in r if v == v),
                                             default=1)
    image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=0, vmax=top)
    ax.set_xticks(range(len(table.columns)))
    ax.set_xticklabels([labels.get(c, c) for c in table.columns], rotation=35, ha="right",
                       fontsize=8)
    ax.set_yticks(range(len(table.rows)))
    ax.set_yticklabels(table.rows, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):  # dark text on light cells, light text on dark ones
                ax.text(j, i, f"{v:.{table.digits}f}", ha="center", va="center", fontsize=8,
                        color="white" if v > 0.6 * top else "black")
    fig.colorbar(image, ax=ax, fraction=0.03)
    ax.set_title(table.title, fontsize=10)
    return _png(fig)


def curves(records: list[Record]) -> bytes | None:
    """Clean accuracy and ASR per epoch (or round), mean over each row's seeds."""
    rows = list(dict.fromkeys(r.row for r in records))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = False
    for row in rows:
        runs = [r.curve for r in records if r.row == row and r.curve]
        if not runs:
            continue
        length = min(len(c) for c in runs)
        x = [runs[0][i].get("epoch", i + 1) for i in range(length)]
        for ax, key in zip(axes, ("clean_accuracy", "asr"), strict=True):
            ys = [_mean([c[i].get(key) for c in runs]) for i in range(length)]
            ax.plot(x, [100 * y if y is not None else math.nan for y in ys], label=row)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("Clean accuracy (%)", "Attack success rate (%)"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch / round")
        ax.set_ylim(-2, 102)
    axes[1].legend(fontsize=7, loc="best")
    return _png(fig)


def _mean(values: list[Any]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def histograms(records: list[Record], column: str, label: str) -> bytes | None:
    """The defense's suspicion scores, clean against triggered or poisoned, per row
    (seeds pooled)."""
    import torch

    rows = list(dict.fromkeys(r.row for r in records))[:MAX_PANELS]
    panels = []
    for row in rows:
        parts = [load_file(f) for r in records if r.row == row
                 and (f := r.folder.path / "defenses" / column / "scores.safetensors").is_file()]
        parts = [p for p in parts if "scores" in p and "positive" in p]
        if parts:
            scores = torch.cat([p["scores"].float() for p in parts])
            positive = torch.cat([p["positive"].bool() for p in parts])
            panels.append((row, scores, positive))
    if not panels:
        return None
    plt = _plt()
    cols = min(3, len(panels))
    lines = -(-len(panels) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 2.6 * lines), squeeze=False)
    for ax, (row, scores, positive) in zip(axes.flat, panels, strict=False):
        ax.hist(scores[~positive].numpy(), bins=40, alpha=0.6, label="clean")
        if bool(positive.any()):
            ax.hist(scores[positive].numpy(), bins=40, alpha=0.6, label="backdoor")
        ax.set_title(row, fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{label}: suspicion scores", fontsize=10)
    return _png(fig)
