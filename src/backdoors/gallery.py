"""Pictures of a trigger: clean test images next to their triggered copies, with labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


Row = tuple[Tensor, list[str], list[str], str]  # images, titles, title colours, row label


def _plot(rows: list[Row], title: str, out: Path) -> Path:
    """One PNG: a row of images per entry, each image with its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(rows[0][0])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols, 1.55 * len(rows)),
                             squeeze=False)
    for r, (images, titles, colours, name) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            img = images[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if titles:
                ax.set_title(titles[c], fontsize=7, color=colours[c])
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _namer(names: tuple[str, ...] | None) -> Any:
    return lambda y: names[y] if names and y < len(names) else str(y)


def _samples(synthesizer: Any, test: Dataset, n: int) -> tuple[Batch, Batch]:
    if len(test) == 0:
        raise DataError("the test set is empty; nothing to draw")
    clean = sample_batch(test, first_of_each_class(test, n))
    return clean, synthesizer.apply(clean, 1.0, torch.Generator().manual_seed(TRIGGER_SEED))


def draw_gallery(config: Config, out: Path, n: int = 8) -> Path:
    """Write a PNG: row 1 clean images with true labels, row 2 the same images triggered
    with their backdoor labels, row 3 the absolute change (amplified to full range)."""
    from backdoors.assembly.build import build

    comps = build(config)
    comps.synthesizer.prepare(comps.task.train, stream(config.seed, TRIGGER))
    clean, triggered = _samples(comps.synthesizer,
                                comps.synthesizer.backdoor_test_set() or comps.task.test, n)
    diff = (triggered.inputs - clean.inputs).abs()
    diff = diff / diff.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8)
    label, black = _namer(comps.task.class_names), ["black"] * len(clean)
    rows: list[Row] = [
        (clean.inputs, [label(int(y)) for y in clean.labels], black, "clean"),
        (triggered.inputs, [label(int(y)) for y in triggered.labels], black, "triggered"),
        (diff, [], black, "|change|")]
    return _plot(rows, f"{config.synthesizer.name} on {config.task.name}", out)


@torch.no_grad()
def draw_predictions(run_dir: str | Path, out: Path, n: int = 8) -> Path:
    """Write a PNG of what a trained run's model predicts: clean test images (green when
    right) and the same images triggered (red when the backdoor fires)."""
    from backdoors.assembly.artifact import reopen
    from backdoors.runs import RunFolder

    folder = RunFolder.existing(run_dir)
    target = reopen(folder)
    synth = target.synthesizer
    clean, triggered = _samples(synth, synth.backdoor_test_set() or
                                target.test_loader.dataset, n)
    model = target.model.eval()
    device = target.device
    said = model(clean.inputs.to(device)).argmax(1).cpu()
    fooled = model(triggered.inputs.to(device)).argmax(1).cpu()
    label = _namer(None)
    rows: list[Row] = [
        (clean.inputs, [f"{label(int(p))} (true {label(int(y))})" for p, y in
                        zip(said, clean.labels, strict=True)],
         ["green" if p == y else "black" for p, y in zip(said, clean.labels, strict=True)],
         "clean: predicted"),
        (triggered.inputs, [label(int(p)) for p in fooled],
         ["red" if p == b else "black" for p, b in zip(fooled, triggered.labels, strict=True)],
         "triggered: predicted")]
    return _plot(rows, f"{folder.path.name}: the trained model's predictions", out)
