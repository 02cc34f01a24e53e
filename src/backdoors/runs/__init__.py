"""Run folders: atomic files, the checkpoint commit, the metrics log, the writer lock."""

from backdoors.runs.commit import load_commit, save_commit
from backdoors.runs.folder import RunFolder, clean_json, create_run_folder
from backdoors.runs.lock import RunLock, is_locked
from backdoors.runs.weights import check_finite, load_into, load_weights, save_weights, state_of

__all__ = [
    "RunFolder", "RunLock", "check_finite", "clean_json", "create_run_folder", "is_locked",
    "load_commit", "load_into", "load_weights", "save_commit", "save_weights", "state_of",
]
