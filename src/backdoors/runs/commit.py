"""The checkpoint: one file, published atomically, from which a run resumes exactly.

A commit holds everything a resumed run needs and nothing it must find elsewhere: the
model's weights, the inner loop's state (optimizer, scheduler, generators, attack,
aggregator), the global random states, the best figure so far, the fingerprints of the
config and trigger it was trained under, and the size metrics.jsonl had when it was made.
Because all of it is one file written by runs/files.write_atomic, weights and state can
never come from different epochs, and rows logged after it (a killed epoch's training
losses) are cut off on resume. Loaded with weights_only=True: nothing is unpickled.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from backdoors.errors import RunError
from backdoors.runs.files import write_atomic
from backdoors.runs.folder import RunFolder

COMMIT_NAME = "commit.pt"
FORMAT = 1
KEYS = ("format", "unit", "log_bytes", "weights", "loop", "rng", "best", "fingerprint")


def save_commit(folder: RunFolder, commit: dict[str, Any]) -> None:
    """Publish the commit (a dict with KEYS, `format` filled in here)."""
    data = {**commit, "format": FORMAT}
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise ValueError(f"commit lacks {missing}")
    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_atomic(folder.checkpoints / COMMIT_NAME, lambda f: f.write(buffer.getvalue()))


def load_commit(folder: RunFolder) -> dict[str, Any] | None:
    """The run's last commit, or None when it made none yet."""
    path = folder.checkpoints / COMMIT_NAME
    if not path.is_file():
        if (folder.checkpoints / "last_state.pt").is_file():
            raise RunError(f"{folder.path} was made by an older version of backdoors whose "
                           "checkpoints cannot be resumed; start a new run")
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file can raise almost anything
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RunError(f"{path} is damaged ({first}); the run cannot be resumed") from None
    if not isinstance(data, dict) or any(k not in data for k in KEYS):
        raise RunError(f"{path} is damaged (not a checkpoint commit)")
    if data["format"] != FORMAT:
        raise RunError(f"{path} has checkpoint format {data['format']}, this version reads "
                       f"{FORMAT}")
    return data
