"""Run folders: config, environment, metrics log, summary, checkpoints, TensorBoard.

Layout of one run:
    config.yaml     resolved config (defaults filled in)
    env.json        versions, git commit, seed, command line
    metrics.jsonl   one JSON row per event, append-only: the source of truth
    summary.json    final figures and status (running / completed / interrupted / failed)
    attack.json     trigger spec and poison indices (what a defense needs later)
    checkpoints/    last.safetensors + last_state.pt (resume), best.safetensors, epoch_N
    tb/             TensorBoard events
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from backdoors.errors import RunError


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes null, tensors become numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def new_run_dir(out: str | Path, name: str, exact: bool) -> Path:
    """Create a fresh run folder. With `exact`, `out/name` must not exist; otherwise a
    timestamp is appended (and a counter if needed). Never reuses an existing folder."""
    root = Path(out)
    if exact:
        path = root / name
        if path.exists():
            raise RunError(f"run folder {path} already exists; choose another --name, or "
                           f"continue it with: backdoors train --resume {path}")
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path, i = root / f"{name}-{stamp}", 1
        while path.exists():
            i += 1
            path = root / f"{name}-{stamp}-{i}"
    path.mkdir(parents=True, exist_ok=False)
    (path / "checkpoints").mkdir()
    return path


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Run:
    """Writes one run folder. Reopening an existing folder (resume) appends to it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    def write_config(self, config: dict[str, Any]) -> None:
        _atomic_write(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def write_env(self, seed: int, device: str, resumed: bool = False) -> None:
        env = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device": device,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "git_commit": git_commit(),
            "seed": seed,
            "argv": sys.argv,
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        from backdoors import __version__

        env["backdoors"] = __version__
        name = "env.json" if not resumed else f"env-resume-{env['time'].replace(':', '')}.json"
        _atomic_write(self.path / name, json.dumps(env, indent=2))

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after `epoch` (a partial epoch cut off by a kill)."""
        kept = [r for r in self.rows() if r.get("epoch", 0) <= epoch]
        _atomic_write(self.path / "metrics.jsonl",
                      "".join(json.dumps(r) + "\n" for r in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(_clean(summary), indent=2))

    def read_summary(self) -> dict[str, Any]:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        _atomic_write(self.path / name, json.dumps(_clean(data), indent=2))

    def save_weights(self, model: torch.nn.Module, name: str) -> None:
        tmp = self.checkpoints / f"{name}.safetensors.tmp"
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp))
        os.replace(tmp, self.checkpoints / f"{name}.safetensors")

    def save_state(self, state: dict[str, Any]) -> None:
        """Training state for resume; written after the weights, so its presence marks a
        complete checkpoint."""
        tmp = self.checkpoints / "last_state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoints / "last_state.pt")

    def load_state(self) -> dict[str, Any] | None:
        path = self.checkpoints / "last_state.pt"
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch checkpoint (loaded with weights_only=True;
    a Backdoors 101 checkpoint's 'state_dict' entry is unwrapped)."""
    p = Path(path)
    if not p.is_file():
        raise RunError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is a user-facing error
        raise RunError(f"{p}: not a safe weights file ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise RunError(f"{p}: expected a state dict")
    return data
