"""Complex backdoor: a trigger switches the model to a different task (counting -> identity)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.errors import ConfigError
from backdoors.synthesizers.base import SYNTHESIZERS, LabelMode
from backdoors.synthesizers.pattern import SinglePixelSynthesizer

if TYPE_CHECKING:
    from backdoors.data.dataset import Dataset


def dataset_aux(ds: Dataset | torch.utils.data.Subset) -> Tensor | None:
    """The aux labels of a dataset, also through the Subset that `max_train_samples` makes
    of a streaming dataset."""
    if isinstance(ds, torch.utils.data.Subset):
        base = dataset_aux(ds.dataset)
        return None if base is None else base[torch.as_tensor(ds.indices)]
    return getattr(ds, "aux", None)


@SYNTHESIZERS.register("complex")
class ComplexSynthesizer(SinglePixelSynthesizer):
    """Blind Backdoors' complex backdoor (Bagdasaryan & Shmatikov, arXiv 2005.03823).

    The input gets the single-pixel trigger (one white pixel at `position`, default
    (3, 23)); the label becomes the sample's auxiliary label: on a people-counting task
    (counting, pipa) the trigger makes the model output the identity of a target person
    instead of the count. Aux 0 means "no target person": those rows are not scored
    (`counted`) and weigh `no_target_weight` (default 0.1) in the backdoor loss
    (`loss_weights`), so the backdoor is not dominated by the majority "nobody" label.
    Backdoors 101 balanced its Pipa losses per label instead (each label's rows summing
    to one unit); a fixed weight is simpler to reason about and does not depend on the
    batch's label mix.

    Rows without aux get the ordinary `target` (default 0, so it is a class of any task) /
    `label_mode` labels; `prepare` refuses a training set without one aux label per sample.
    """

    label_function = "the identity in the aux labels"

    def __init__(
        self,
        target: int = 0,
        label_mode: LabelMode = "all_to_one",
        no_target_weight: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(target, label_mode, **kwargs)
        if not 0.0 <= no_target_weight <= 1.0:
            raise ValueError(f"no_target_weight must be in [0, 1], got {no_target_weight}")
        self.no_target_weight = no_target_weight

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        aux = dataset_aux(train)
        if aux is None or aux.dim() != 1:
            raise ConfigError("synthesizer complex takes its labels from the task's aux labels "
                              "(one per sample, e.g. an identity); use the counting or pipa task")
        if len(aux) and not 0 <= int(aux.min()) <= int(aux.max()) < self.num_classes:
            raise ConfigError(f"synthesizer complex: aux labels must be classes 0..."
                              f"{self.num_classes - 1}, got {int(aux.min())}..{int(aux.max())}")

    def synthesize_labels(self, batch: Batch) -> Tensor:
        if batch.aux is None:
            return super().synthesize_labels(batch)
        return batch.aux.to(batch.labels.dtype)

    def counted(self, batch: Batch) -> Tensor:
        if batch.aux is None:
            return super().counted(batch)
        return batch.aux != 0

    def loss_weights(self, batch: Batch) -> Tensor | None:
        """Per-row weights for the backdoor loss on a poisoned batch: poisoned rows with no
        target identity get `no_target_weight`, every other row 1. None without aux."""
        if batch.aux is None:
            return None
        weights = torch.ones(len(batch), device=batch.device)
        weights[batch.poisoned & (batch.aux == 0)] = self.no_target_weight
        return weights

    def spec(self) -> dict:
        return {**super().spec(), "no_target_weight": self.no_target_weight}
