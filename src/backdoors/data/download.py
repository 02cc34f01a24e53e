"""Fetching and unpacking public datasets: checksummed downloads and safe tar and zip
extraction.

Used only when a task is asked to `download`; every loader also reads files placed by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.request
import zipfile
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


def _expected(md5: str | None, sha256: str | None, unverified: bool) -> tuple[str, str | None]:
    # Prefer sha256; md5 is what most dataset sites publish, and is fine for integrity.
    if sha256:
        return "sha256", sha256.lower()
    if md5:
        return "md5", md5.lower()
    if unverified:
        return "sha256", None
    raise ValueError("download_file needs an md5 or sha256 checksum (or unverified=True)")


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
    unverified: bool = False,
) -> Path:
    """Download `dest` from the first mirror in `urls` that serves it with the right checksum.

    A file already at `dest` with the right checksum is kept. Data is written to a
    temporary file in the same folder and renamed only once verified, so an interrupted
    or corrupted download never leaves a plausible-looking file behind.

    `unverified=True` without a checksum is for files nobody publishes one for: any
    complete download (and any file already at `dest`) is accepted, and the caller checks
    the content instead (a zip's per-file CRC-32s, see `safe_extract_zip`).
    """
    algorithm, want = _expected(md5, sha256, unverified)
    dest = Path(dest)
    try:
        if dest.is_file() and (want is None or file_digest(dest, algorithm) == want):
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
            if want is None or got == want:
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
                parts = _safe_parts(member.name, archive)
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


def _safe_parts(name: str, archive: Path) -> tuple[str, ...]:
    """The path components of an archive member, or a DataError for an absolute path or a
    `..` component (which would write outside the destination)."""
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts:
        raise DataError(f"refusing unsafe path '{name}' in archive {archive}")
    return parts


def safe_extract_zip(archive: Path, dest: Path) -> None:
    """Extract the files and folders of a zip archive into `dest`.

    Refuses absolute paths, `..` components and symbolic links, as `safe_extract_tar`
    does. Reading a member checks its CRC-32, so a truncated or corrupted download fails
    here with a DataError even when no checksum of the whole archive is published.
    """
    dest = Path(dest)
    made: set[Path] = set()
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = _safe_parts(info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):  # Unix mode in the high 16 bits
                    raise DataError(f"refusing link '{info.filename}' in {archive}")
                target = dest.joinpath(*parts)
                folder = target if info.is_dir() else target.parent
                if folder not in made:
                    folder.mkdir(parents=True, exist_ok=True)
                    made.add(folder)
                if info.is_dir():
                    continue
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, _BLOCK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
            OSError) as exc:  # NotImplementedError: a compression method zipfile lacks
        raise DataError(f"cannot extract {archive}: {reason(exc)}; expected an intact zip "
                        "archive (delete it to download it again) and a writable "
                        "destination") from None
