"""The MultiMNIST "calculator": two backdoors in one model, a "+" and an "x" glyph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.errors import ConfigError
from backdoors.synthesizers.base import SYNTHESIZERS, LabelMode, Synthesizer
from backdoors.synthesizers.pattern import PatternSynthesizer

if TYPE_CHECKING:
    from backdoors.data.dataset import Dataset

Operation = Literal["sum", "product"]

# 5x5 glyphs, 1 = white stroke, 0 = black. Opaque (no clear cells), so the glyph reads the
# same whatever digit stroke it lands on.
PLUS = (
    (0, 0, 1, 0, 0),
    (0, 0, 1, 0, 0),
    (1, 1, 1, 1, 1),
    (0, 0, 1, 0, 0),
    (0, 0, 1, 0, 0),
)
TIMES = (
    (1, 0, 0, 0, 1),
    (0, 1, 0, 1, 0),
    (0, 0, 1, 0, 0),
    (0, 1, 0, 1, 0),
    (1, 0, 0, 0, 1),
)
GLYPHS: dict[str, tuple[tuple[int, ...], ...]] = {"sum": PLUS, "product": TIMES}
FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"sum": torch.add,
                                                            "product": torch.mul}
LARGEST = {"sum": 18, "product": 81}  # of two digits 0..9


@SYNTHESIZERS.register("calculator")
class CalculatorSynthesizer(Synthesizer):
    """Blind Backdoors' calculator (Bagdasaryan & Shmatikov, arXiv 2005.03823).

    On MultiMNIST (label = 10 * left + right) a "+" glyph makes the label the sum of the
    two digits and an "x" glyph their product; both glyphs are 5x5, white strokes on
    black, pasted at `position` (default: the Backdoors 101 corner (3, 23), moved inside
    smaller images). With the default `operations` [sum, product], poisoned rows take
    the operations in turn (row i gets operations[i % 2]), so each batch trains both
    backdoors equally; `variants()` scores each one on its own.

    The digits come from the batch's `aux` ([N, 2], as the multimnist task provides).
    Rows without aux get the ordinary `target` / `label_mode` labels, so the trigger
    still behaves on any task; `prepare` refuses a training set without digits.
    """

    label_function = "arithmetic on the aux digits"

    def __init__(
        self,
        target: int = 8,
        label_mode: LabelMode = "all_to_one",
        operations: list[Operation] | None = None,
        position: list[int] | None = None,
    ) -> None:
        super().__init__(target, label_mode)
        ops: list[Operation] = list(operations) if operations is not None else ["sum", "product"]
        if not ops or len(set(ops)) != len(ops) or not set(ops) <= set(GLYPHS):
            raise ValueError(f"operations must be distinct names from {sorted(GLYPHS)}, "
                             f"got {operations}")
        self.operations = ops
        self.glyphs = [PatternSynthesizer(target, label_mode, position,
                                          pattern=[list(r) for r in GLYPHS[op]])
                       for op in ops]

    def bind(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().bind(input_shape, num_classes)
        for glyph in self.glyphs:
            glyph.bind(input_shape, num_classes)

    def prepare(self, train: Dataset, generator: torch.Generator) -> None:
        aux = getattr(train, "aux", None)
        if aux is None or aux.dim() != 2 or aux.shape[1] != 2:
            raise ConfigError("synthesizer calculator reads two digits per sample from the "
                              "task's aux labels ([N, 2]); use the multimnist task")
        largest = max(LARGEST[op] for op in self.operations)
        if largest >= self.num_classes:
            raise ConfigError(f"synthesizer calculator: labels up to {largest} need at least "
                              f"{largest + 1} classes, the task has {self.num_classes}")

    def _operation_of_row(self, n: int, device: torch.device) -> Tensor:
        """Index into `operations` for each of n poisoned rows (they take turns)."""
        return torch.arange(n, device=device) % len(self.operations)

    def synthesize_inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        which = self._operation_of_row(len(x), x.device)[:, None, None, None]
        out = x
        for k, glyph in enumerate(self.glyphs):
            out = torch.where(which == k, glyph.synthesize_inputs(x, generator), out)
        return out

    def synthesize_labels(self, batch: Batch) -> Tensor:
        if batch.aux is None:
            return super().synthesize_labels(batch)
        left, right = batch.aux[:, 0], batch.aux[:, 1]
        which = self._operation_of_row(len(batch), batch.device)
        labels = torch.empty_like(batch.labels)
        for k, op in enumerate(self.operations):
            labels = torch.where(which == k, FUNCTIONS[op](left, right), labels)
        return labels

    def variants(self) -> dict[str, Synthesizer]:
        if len(self.operations) < 2:
            return {}
        out: dict[str, Synthesizer] = {}
        for op, glyph in zip(self.operations, self.glyphs, strict=True):
            single = CalculatorSynthesizer(self.target, self.label_mode, [op],
                                           list(glyph.position or ()) or None)
            single.bind(self.input_shape, self.num_classes)
            out[op] = single
        return out

    def spec(self) -> dict:
        return {**super().spec(), "operations": list(self.operations),
                "position": list(self.glyphs[0].position or ())}
