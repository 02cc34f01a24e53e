"""Model weights on disk: safetensors written by this project, and checkpoints of other
projects (Backdoors 101's .pt.tar) read without unpickling code (weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from backdoors.errors import RunError
from backdoors.runs.files import write_bytes


def state_of(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as contiguous CPU tensors (what is saved)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(path: Path, state: dict[str, Tensor], metadata: dict[str, str] | None = None
                 ) -> None:
    """Publish a state dict as safetensors (atomically, see runs/files.py)."""
    write_bytes(path, save(state, metadata=metadata))


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a torch checkpoint (loaded with weights_only=True;
    a Backdoors 101 checkpoint's 'state_dict' entry is unwrapped). Damaged files and files
    that hold no state dict are one-line RunErrors."""
    p = Path(path)
    if not p.is_file():
        raise RunError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            return load_file(str(p))
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file can raise almost anything
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RunError(f"{p}: not a readable weights file ({first})") from None
    if isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise RunError(f"{p}: expected a state dict of tensors")
    return data


def check_finite(state: dict[str, Tensor], what: str) -> None:
    """Refuse weights with nan or inf entries (a diverged or damaged model)."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RunError(f"{what}: tensor '{name}' holds nan or inf values; refusing "
                           "non-finite weights")


def load_into(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load a state dict into a model; a mismatch is one line naming the first problem."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise RunError(f"{what} does not fit the model ({detail})") from None
