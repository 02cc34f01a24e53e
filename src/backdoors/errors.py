"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BackdoorsError(Exception):
    """Base class for problems with the user's input, data or run folder (exit code 2)."""


class ConfigError(BackdoorsError):
    """A config key, value or component name is wrong."""


class DataError(BackdoorsError):
    """A dataset is missing or malformed."""


class RunError(BackdoorsError):
    """A run folder is missing, incomplete or would be overwritten."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
