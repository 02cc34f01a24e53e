"""Pictures of a trigger: clean test images next to their triggered copies, with labels."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.config import Config
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.errors import DataError
from backdoors.seeds import TRIGGER, stream

TRIGGER_SEED = 0


def first_of_each_class(ds: Dataset, n: int) -> Tensor:
    """Indices of up to n samples, cycling through the classes so every class shows."""
    labels = ds.labels.cpu()
    by_class = [(labels == c).nonzero().flatten().tolist() for c in labels.unique().tolist()]
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(rows) for rows in by_class):
        picked += [rows[depth] for rows in by_class if depth < len(rows)][: n - len(picked)]
        depth += 1
    return torch.tensor(picked, dtype=torch.long)


def sample_batch(ds: Dataset, idx: Tensor) -> Batch:
    """Float pixels of the chosen samples (in-memory or streaming datasets)."""
    if isinstance(ds, ArrayDataset):
        aux = None if ds.aux is None else ds.aux[idx]
        return Batch.make(ds.images[idx].float() / 255.0, ds.labels[idx], idx, aux)
    items = [ds[int(i)] for i in idx]
    return Batch.make(torch.stack([x for x, _, _ in items]),
                      torch.tensor([y for _, y, _ in items]), idx)


def draw_gallery(config: Config, out: Path, n: int = 8) -> Path:
    """Write a PNG: row 1 clean images with true labels, row 2 the same images triggered
    with their backdoor labels, row 3 the absolute change (amplified to full range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backdoors.assembly.build import build

    comps = build(config)
    comps.synthesizer.prepare(comps.task.train, stream(config.seed, TRIGGER))
    test = comps.synthesizer.backdoor_test_set() or comps.task.test
    if len(test) == 0:
        raise DataError("the test set is empty; nothing to draw")
    clean = sample_batch(test, first_of_each_class(test, n))
    triggered = comps.synthesizer.apply(clean, 1.0, torch.Generator().manual_seed(TRIGGER_SEED))
    diff = (triggered.inputs - clean.inputs).abs()
    diff = diff / diff.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8)
    names = comps.task.class_names
    label = (lambda y: names[y] if names and y < len(names) else str(y))  # noqa: E731
    cols = len(clean)
    fig, axes = plt.subplots(3, cols, figsize=(1.4 * cols, 4.6), squeeze=False)
    rows = [(clean.inputs, clean.labels, "clean"),
            (triggered.inputs, triggered.labels, "triggered"),
            (diff, None, "|change|")]
    for r, (images, labels, title) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            img = images[c].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if labels is not None:
                ax.set_title(label(int(labels[c])), fontsize=8)
        axes[r][0].set_ylabel(title, fontsize=9)
    fig.suptitle(f"{config.synthesizer.name} on {config.task.name}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
