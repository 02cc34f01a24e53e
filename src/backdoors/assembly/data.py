"""The datasets of a run, and the indices that refer to them, made in one place.

Row i of `clean_train` and row i of `train` are the same training sample, before and
after the attack; `poisoned` marks the rows the attack changed. Every index a run
records (attack.json's poison indices, a defense's clean budget, a sanitizer's verdicts)
is a row of these two, so none can point into another index space. Rows the trigger
takes out of the main task (semantic and edge-case inputs) are not in them at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from backdoors.assembly.build import Components
from backdoors.config import Config
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.data.loader import Loader
from backdoors.seeds import POISON, TRIGGER, stream


@dataclass
class TrainingData:
    """The training rows of a run: clean, as the victim receives them, and which differ."""

    clean_train: Dataset
    train: Dataset
    poisoned: Tensor

    def poison_indices(self) -> Tensor:
        return self.poisoned.nonzero().flatten()


def training_data(config: Config, comps: Components, central: bool = True) -> TrainingData:
    """Prepare the trigger on the task's training set (its own seeded stream), drop the
    rows the trigger takes out of the main task, and (`central`) let the attack poison
    the rest (another stream). A federated run poisons clients' shares instead, so its
    `train` is the clean set until the loop reports which rows attackers poisoned. Both
    steps are deterministic, so resume and defenses re-make exactly this."""
    task, synth = comps.task, comps.synthesizer
    synth.prepare(task.train, stream(config.seed, TRIGGER))
    clean = without(task.train, synth.excluded(task.train, "train"))
    if not central:
        return TrainingData(clean, clean, torch.zeros(len(clean), dtype=torch.bool))
    train, idx = comps.attack.poison_training_set(clean, stream(config.seed, POISON))
    return TrainingData(clean, train, mask_of(idx, len(clean)))


def mask_of(indices: Tensor, n: int) -> Tensor:
    """A boolean mask over n rows, True at `indices`."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[indices.cpu()] = True
    return mask


def without(ds: Dataset, drop: Tensor | None) -> Dataset:
    """`ds` minus the rows in `drop` (backdoor inputs that leave the main task)."""
    if drop is None or len(drop) == 0:
        return ds
    keep = ~mask_of(drop, len(ds))
    rows = keep.nonzero().flatten()
    if isinstance(ds, ArrayDataset):
        return ds.subset(rows)
    return torch.utils.data.Subset(ds, rows.tolist())  # type: ignore[return-value]


def prepare_model(model: nn.Module, ds: Dataset) -> None:
    """Fit a model's data-dependent layers (ImageClassifier.prepare) to `prepare_images`
    rows of `ds`, evenly spaced so that a class-sorted set gives every class. Called once
    when a run starts from scratch, on the rows the victim trains on."""
    n = min(getattr(model, "prepare_images", 0), len(ds))
    if n == 0:
        return
    rows = torch.linspace(0, len(ds) - 1, n).round().long()
    if isinstance(ds, ArrayDataset):
        images = ds.images[rows.to(ds.images.device)].float().div_(255.0)
    else:
        images = torch.stack([ds[int(i)][0] for i in rows])
    model.prepare(images)  # type: ignore[operator]


def on_device(ds: Dataset, device: torch.device) -> Dataset:
    """In-memory datasets live on the training device (no copy per batch)."""
    return ds.to(device) if isinstance(ds, ArrayDataset) and device.type != "cpu" else ds


def evaluation_loaders(comps: Components, batch_size: int) -> tuple[Loader, Loader | None]:
    """The clean test loader (without the trigger's own backdoor inputs), and a loader of
    those inputs when the trigger brings its own (semantic, edge-case)."""
    device, synth = comps.device, comps.synthesizer
    test_set = without(comps.task.test, synth.excluded(comps.task.test, "test"))
    test = Loader(on_device(test_set, device), batch_size, device,
                  num_workers=comps.task.num_workers)
    own = synth.backdoor_test_set()
    return test, None if own is None else Loader(on_device(own, device), batch_size, device)
