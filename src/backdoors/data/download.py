"""Fetching and unpacking public datasets: checksummed downloads and safe tar extraction.

Used only when a task is asked to `download`; every loader also reads files placed by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from backdoors.data.checks import reason
from backdoors.errors import DataError

_BLOCK = 1 << 20


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected(md5: str | None, sha256: str | None) -> tuple[str, str]:
    # Prefer sha256; md5 is what most dataset sites publish, and is fine for integrity.
    if sha256:
        return "sha256", sha256.lower()
    if md5:
        return "md5", md5.lower()
    raise ValueError("download_file needs an md5 or sha256 checksum")


def _fetch(url: str, out_fd: int, algorithm: str, timeout: float) -> str:
    """Stream `url` into the open file descriptor; return the hex digest of what was written."""
    digest = hashlib.new(algorithm)
    with os.fdopen(out_fd, "wb") as out:
        request = urllib.request.Request(url, headers={"User-Agent": "backdoors"})
        with urllib.request.urlopen(request, timeout=timeout) as src:
            while block := src.read(_BLOCK):
                digest.update(block)
                out.write(block)
    return digest.hexdigest()


def download_file(
    urls: Sequence[str],
    dest: Path,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download `dest` from the first mirror in `urls` that serves it with the right checksum.

    A file already at `dest` with the right checksum is kept. Data is written to a
    temporary file in the same folder and renamed only once verified, so an interrupted
    or corrupted download never leaves a plausible-looking file behind.
    """
    algorithm, want = _expected(md5, sha256)
    dest = Path(dest)
    try:
        if dest.is_file() and file_digest(dest, algorithm) == want:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot download to {dest}: {reason(exc)}; expected a writable "
                        "folder") from None
    failures = []
    for url in urls:
        fd, tmp = _temporary(dest)
        try:
            got = _fetch(url, fd, algorithm, timeout)
            if got == want:
                os.replace(tmp, dest)
                return dest
            failures.append(f"{url}: {algorithm} {got} != expected {want}")
        except (OSError, ValueError) as exc:  # network errors are OSErrors; bad URLs ValueErrors
            failures.append(f"{url}: {reason(exc)}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise DataError(f"could not download {dest.name} to {dest.parent}: {'; '.join(failures)}")


def _temporary(dest: Path) -> tuple[int, str]:
    """A temporary file next to `dest` (so the final rename stays on one file system)."""
    try:
        return tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DataError(f"cannot write to {dest.parent}: {reason(exc)}; expected a writable "
                        "folder") from None


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract the regular files and folders of a tar archive into `dest`.

    Refuses absolute paths, `..` components, links and device files (a crafted archive
    could otherwise write outside `dest`), and does not restore owners or permissions.
    """
    dest = Path(dest)
    made: set[Path] = set()  # folders already created: saves a syscall per file
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    raise DataError(f"refusing unsafe path '{member.name}' in archive {archive}")
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"refusing link or special file '{member.name}' in {archive}")
                target = dest.joinpath(*parts)
                folder = target if member.isdir() else target.parent
                if folder not in made:
                    folder.mkdir(parents=True, exist_ok=True)
                    made.add(folder)
                if member.isdir():
                    continue
                src = tar.extractfile(member)
                if src is None:
                    raise DataError(f"cannot read '{member.name}' from archive {archive}")
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, _BLOCK)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot extract {archive}: {reason(exc)}; expected an intact tar "
                        "archive and a writable destination") from None
