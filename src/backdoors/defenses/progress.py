"""What a running defense is doing, on a terminal: one progress bar per phase ("reversing
the trigger of class 3", "fine-tuning"), so a defense that takes minutes is not silent.
Off the terminal (logs, tests, sweeps) it prints nothing."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Progress:
    """Phases of one defense; `enabled` only on an interactive terminal by default."""

    def __init__(self, name: str = "", enabled: bool | None = None) -> None:
        self.name = name
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def phase(self, items: Iterable[T], what: str, total: int | None = None) -> Iterator[T]:
        """Iterate `items` while showing `name: what` with a bar (and ETA when `total` or
        len(items) is known)."""
        if not self.enabled:
            yield from items
            return
        from tqdm import tqdm

        size = total if total is not None else _len(items)
        yield from tqdm(items, desc=f"{self.name}: {what}", total=size, leave=False,
                        dynamic_ncols=True, file=sys.stderr)


def _len(items: Any) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None


SILENT = Progress(enabled=False)
