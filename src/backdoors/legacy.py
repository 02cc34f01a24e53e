"""The Backdoors 101 command line: `python training.py --name NAME --params FILE`.

Accepts the original flat YAML files, prints the original per-epoch lines (so log parsers
keep working), writes TensorBoard to runs/<name> when `tb: true` and checkpoints under
saved_models/ when `save_model: true`, and also writes a native run folder.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backdoors.config import apply_overrides, convert_legacy, from_dict, is_legacy, read_yaml
from backdoors.errors import ConfigError, report
from backdoors.hooks import Hook, TensorBoardHook


def legacy_lines(epoch: int, row: dict[str, Any]) -> list[str]:
    """The two lines Backdoors 101 printed after testing each epoch (accuracy in %)."""

    def line(flag: str, acc: float | None, loss: float | None) -> str:
        acc_v = 0.0 if acc is None else 100.0 * acc
        loss_v = 0.0 if loss is None else loss
        return (f"Backdoor {flag}. Epoch: {epoch}. Accuracy: Top-1: {acc_v:.2f} | "
                f"Loss: value: {loss_v:.2f}")

    return [line("False", row["clean_accuracy"], row["clean_loss"]),
            line("True ", row["backdoor_accuracy"], row["backdoor_loss"])]


class LegacyHook(Hook):
    """Original console lines and saved_models/ checkpoints (model_last.pt.tar, .best,
    .epoch_N) holding state_dict, epoch, lr and the flat params."""

    def __init__(self, params: dict[str, Any], folder: Path | None) -> None:
        self.params, self.folder, self.best = params, folder, -1.0
        self.save_on = set(params.get("save_on_epochs") or [])

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: nn.Module) -> None:
        for text in legacy_lines(epoch, row):
            print(text, flush=True)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "epoch": epoch, "lr": row["lr"], "params_dict": self.params}
        torch.save(state, self.folder / "model_last.pt.tar")
        if epoch in self.save_on:
            torch.save(state, self.folder / f"model_last.pt.tar.epoch_{epoch}")
        if row["clean_accuracy"] > self.best:
            self.best = row["clean_accuracy"]
            torch.save(state, self.folder / "model_last.pt.tar.best")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like the `backdoors` command (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(description="Backdoors 101 compatible training")
    parser.add_argument("--name", required=True, help="run name (runs/<name> for TensorBoard)")
    parser.add_argument("--params", required=True, help="flat Backdoors 101 YAML file")
    parser.add_argument("--commit", default=None, help="accepted for compatibility; unused")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a native config value")
    args = parser.parse_args(argv)
    from backdoors.experiment import Interrupted, run

    try:
        params = read_yaml(args.params)
        if not is_legacy(params):
            raise ConfigError(f"{args.params} is not a Backdoors 101 flat config; "
                              f"use: backdoors train {args.params}")
        native = convert_legacy(params, source=args.params)
        native["name"] = args.name
        native["train"]["tensorboard"] = False  # the legacy hook writes runs/<name> instead
        config = from_dict(apply_overrides(native, args.overrides))
        stamp = _dt.datetime.now().strftime("%b.%d_%H.%M.%S")
        folder = None
        if params.get("save_model"):
            task = params.get("task", "MNIST")
            folder = Path("saved_models") / f"model_{task}_{stamp}_{args.name}"
        hooks: list[Hook] = [LegacyHook(params, folder)]
        if params.get("tb"):
            hooks.append(TensorBoardHook(Path("runs") / args.name))
        summary = run(config, out="runs", hooks=hooks, quiet=True)
    except Interrupted as stop:
        print(f"interrupted; resume with: backdoors train --resume {stop.run_dir}",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (errors.report)
        return report(exc)
    print(f"run folder: {summary['run_dir']}")
    return 0
