"""Errors. Those a user can fix (BackdoorsError) print as one line and exit with code 2;
a run that failed on its own (RunFailed) prints one line and exits with code 1."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable


class BackdoorsError(Exception):
    """Base class for problems with the user's input, data or run folder (exit code 2)."""


class ConfigError(BackdoorsError):
    """A config key, value or component name is wrong."""


class DataError(BackdoorsError):
    """A dataset is missing or malformed."""


class RunError(BackdoorsError):
    """A run folder is missing, incomplete, damaged, busy or would be overwritten."""


class Diverged(Exception):  # noqa: N818 - reads as "training diverged"
    """A training loss (or the model) became non-finite. `where` says when, e.g.
    "epoch 2, step 37"; the lifecycle turns it into a failed run."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{what} at {where}")
        self.where, self.what = where, what


class RunFailed(Exception):  # noqa: N818 - reads as "the run failed"
    """A run stopped with status `failed`; its summary.json records the error (exit 1)."""


def fail(message: str, code: int = 2) -> int:
    """Print `error: message` as one line on stderr; return the exit code."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


def report(exc: Exception) -> int:
    """One line for any error a command ends with, and its exit code: 2 for what the user
    can fix, 1 for a failed run or an unexpected error (whose traceback BACKDOORS_DEBUG=1
    shows: the command then re-raises)."""
    if isinstance(exc, BackdoorsError):
        return fail(str(exc))
    if isinstance(exc, RunFailed):
        return fail(str(exc), 1)
    if os.environ.get("BACKDOORS_DEBUG"):
        raise exc
    first = (str(exc).splitlines() or [""])[0]
    return fail(f"unexpected {type(exc).__name__}: {first} (set BACKDOORS_DEBUG=1 for the "
                "traceback)", 1)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
