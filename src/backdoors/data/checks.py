"""Shared wording and checks for dataset errors: one line that names the file or folder.

Library messages (torch, PIL, pickle) can span lines or carry terminal colour codes; the
CLI prints a DataError as `error: <message>`, so everything here collapses to one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from backdoors.errors import DataError, did_you_mean

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip", ".gz")
MAX_REASON = 300  # characters kept from a library's message: enough to say what went wrong


def reason(exc: BaseException) -> str:
    """One line saying why `exc` happened: an OS error's own text without the path (the
    caller names the file), else the message with whitespace collapsed, else the type."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def require_folder(path: Path, expected: str) -> None:
    """Raise a DataError when `path` exists but is a file (a mistyped data_dir, or an archive
    that was never extracted) or cannot be read; a missing folder is left to the reader's own
    message, which lists every place it looked."""
    if path.exists() and not path.is_dir():
        hint = "; extract it first" if path.name.lower().endswith(_ARCHIVES) else ""
        raise DataError(f"data_dir {path} is a file, not a folder; expected a folder holding "
                        f"{expected}{hint}")
    # Without read and search permission every file inside looks absent, which would give a
    # misleading "not found".
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"cannot read folder {path}: permission denied; expected a readable "
                        f"folder holding {expected}")


def scan(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of `folder`, or a DataError when it cannot be listed (permissions, not a
    folder), instead of the bare OSError traceback."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise DataError(f"cannot list folder {folder}: {reason(exc)}; expected a readable "
                        "folder") from None


def near_miss(folder: Path, expected: Iterable[str]) -> str:
    """'; found X (did you mean 'Y'?)' for the first name in `folder` close to an expected
    one it is not, else ''. Helps with files renamed by a mirror or an unpacking tool; an
    unreadable folder is reported too, since its files would look absent."""
    wanted = list(expected)
    try:
        names = sorted(os.listdir(folder))
    except PermissionError:
        return f"; cannot list {folder}: permission denied"
    except OSError:
        return ""
    for name in names:
        if name not in wanted and (hint := did_you_mean(name, wanted)):
            return f"; found '{name}'{hint}"
    return ""
