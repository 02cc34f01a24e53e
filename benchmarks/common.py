"""Shared helpers for benchmark scripts: where the real data is, and the standard splits."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = REPO / ".cache"


def mnist_split_dir() -> Path:
    """The project's standard MNIST split (train = first 8,000 images of the official test
    file, test = last 2,000), prepared as `backdoors data mnist-split` does, in the place
    the configs read it from (.data/mnist-split)."""
    from backdoors.prepare import prepare

    source = SHARED_DATA / "mnist-t10k"
    if not source.is_dir():
        raise SystemExit(f"benchmark needs {source} (the shared MNIST test set)")
    return (REPO / prepare("mnist-split", str(source), str(REPO / ".data/mnist-split"))).resolve()


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def data_overrides(config_path: Path) -> list[str]:
    """Point MNIST and CIFAR tasks at the cached real data."""
    from backdoors.config import load_config

    task = load_config(config_path).task.name
    if task in ("mnist", "multimnist", "counting"):
        return [f"task.data_dir={mnist_split_dir()}"]
    if task == "cifar10":
        from backdoors.data.cifar import extract_shared_cifar

        root = extract_shared_cifar(SHARED_DATA / "cifar10-jpg.tar.gz", CACHE / "cifar10-jpg")
        return [f"task.data_dir={root}"]
    return []


def table_row(*cells: object) -> str:
    """One Markdown table line."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def write_table(out: Path, title: str, columns: list[str], rows: list[str]) -> None:
    """Write a Markdown results file: a title line, then a table of `columns` over `rows`
    (each a `table_row`)."""
    head = [table_row(*columns), "|" + " --- |" * len(columns)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([title, "", *head, *rows]) + "\n")
    print(f"wrote {out}")
