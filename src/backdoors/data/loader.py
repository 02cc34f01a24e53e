"""Turn datasets into batches of float pixels on the training device.

In-memory datasets are indexed directly (no DataLoader, no per-sample Python); streaming
datasets go through a torch DataLoader with workers.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.errors import DataError

Augment = Callable[[Tensor, torch.Generator], Tensor]
T = TypeVar("T")

# torch re-raises a worker's exception as "Caught <Type> in DataLoader worker process <n>.
# Original Traceback (most recent call last): ..." with the whole traceback in the message.
_WORKER = re.compile(r"^Caught \w+ in (.+?)\.\n(?:Original )?Traceback", re.DOTALL)
# A worker killed by a signal (a decoder crash, the OOM killer) gives a one-line RuntimeError.
_WORKER_DIED = re.compile(r"DataLoader worker \(pid.*?\) (?:exited unexpectedly|is killed by)")
_EXC_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?:: (?P<message>.*))?$")


@dataclass
class Loader:
    """Iterates a dataset in batches; re-iterable, one pass per `iter()`.

    Shuffling and augmentation draw from `generator`, so a run is reproducible and its
    state can be checkpointed. `max_batches` stops each pass early (legacy max_batch_id).
    """

    dataset: Dataset
    batch_size: int
    device: torch.device
    shuffle: bool = False
    generator: torch.Generator | None = None
    augment: Augment | None = None
    max_batches: int | None = None
    num_workers: int = 0

    def __len__(self) -> int:
        n = -(-len(self.dataset) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.dataset, ArrayDataset):
            yield from self._iter_array(self.dataset)
        else:
            yield from self._iter_stream()

    def _order(self, n: int) -> Tensor:
        if self.shuffle:
            return torch.randperm(n, generator=self.generator)
        return torch.arange(n)

    def _iter_array(self, ds: ArrayDataset) -> Iterator[Batch]:
        order = self._order(len(ds)).to(ds.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = ds.images[idx].to(self.device, non_blocking=True).float().div_(255.0)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            aux = None if ds.aux is None else ds.aux[idx].to(self.device)
            yield Batch.make(x, ds.labels[idx].to(self.device), idx.to(self.device), aux)

    def _iter_stream(self) -> Iterator[Batch]:
        order = self._order(len(self.dataset)).tolist()
        loader = torch.utils.data.DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        start = 0
        for b, (x, y, aux) in enumerate(_one_line_errors(loader, self.num_workers > 0)):
            if self.max_batches is not None and b >= self.max_batches:
                break
            idx = torch.tensor(order[start : start + len(y)], device=self.device)
            start += len(y)
            x = x.to(self.device, non_blocking=True)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            aux_t = aux.to(self.device) if bool((aux >= 0).any()) else None
            yield Batch.make(x, y.to(self.device), idx, aux_t)


def _one_line_errors(batches: Iterable[T], workers: bool) -> Iterator[T]:
    """Yield from a DataLoader, turning failures in its worker processes into one-line
    DataErrors: torch would print the worker's whole traceback inside the message."""
    iterator = iter(batches)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            message = worker_error_message(exc, workers)
            if message is None:
                raise
            # torch's re-raise leaves a cycle (exception -> traceback -> frame -> exception)
            # that holds the loader's iterator until a garbage collection; a DataLoader forked
            # meanwhile would inherit it and print its failed shutdown from the new workers.
            traceback.clear_frames(exc.__traceback__)
        else:
            yield item
            continue
        del iterator  # shuts the workers down now
        raise DataError(message)  # outside the handler: no chained multi-line traceback


def worker_error_message(exc: BaseException, workers: bool = True) -> str | None:
    """One line for an exception that came from a loader worker, else None.

    torch re-raises a worker's exception with the worker's traceback as its message; the
    last exception in it is the original: a DataError keeps its own message (it already
    names the file), other types keep their name. A worker that died (crashed decoder,
    out of memory) surfaces as a RuntimeError, or as a broken connection when the parent
    was receiving its batch.
    """
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    flat = " ".join(text.split())
    if _WORKER_DIED.search(text):
        died = flat.rstrip(".")
    elif workers and isinstance(exc, ConnectionError | EOFError):
        died = f"a DataLoader worker died ({type(exc).__name__}: {flat})"
    else:
        died = ""
    if died:
        return (f"{died}: a decoder may have crashed on a corrupt file or the machine ran out "
                "of memory; rerun with num_workers: 0 to find the file")
    caught = _WORKER.match(text)
    if caught is None:
        return None
    kind, message = _original_exception(text)
    if kind.rsplit(".", 1)[-1] == "DataError" and message:
        return message
    detail = f"{kind.rsplit('.', 1)[-1]}: {message}" if message else kind
    return (f"{caught.group(1)} failed: {detail}; rerun with num_workers: 0 to see where it "
            "was raised")


def _original_exception(text: str) -> tuple[str, str]:
    """(type name, message) from a formatted traceback: the first unindented line after the
    last frame, and any lines of its message that follow, joined into one line."""
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    tail = lines[frames[-1] + 1 :] if frames else lines[1:]
    start = next((i for i, line in enumerate(tail) if line and not line[0].isspace()), None)
    if start is None:
        return "unknown error", ""
    found = _EXC_LINE.match(tail[start])
    if found is None:
        return "error", " ".join(" ".join(tail[start:]).split())
    rest = [found.group("message") or "", *tail[start + 1 :]]
    return found.group("type"), " ".join(" ".join(rest).split())
