"""The run lifecycle, in one place: a run from its folder to its final summary.

`run` builds and checks every component, loads the data, then makes the run folder;
`resume` re-opens one. Either way the lifecycle prepares the trigger and the poisoned
training set from their seeded streams, writes the attack artifact, and drives an inner
loop (epochs: training/loop.py, federated rounds: federated/loop.py) one unit at a time.
After each unit it logs the unit's row and publishes one checkpoint commit
(runs/commit.py) holding the weights, the loop's state, the random states and the size of
the metrics log, so a process killed at any instant resumes to the same final weights and
metrics as an uninterrupted run. One process writes a folder at a time (runs/lock.py);
SIGINT/SIGTERM leave status `interrupted`, any failure `failed` with its error.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from backdoors.assembly.artifact import write_artifact
from backdoors.assembly.build import (
    Components,
    build,
    fingerprint,
    load_start_weights,
    resolved_config,
    saved_config,
    start_path,
    trigger_fingerprint,
)
from backdoors.assembly.data import mask_of, prepare_model, training_data
from backdoors.assembly.defending import defend_all, defense_key
from backdoors.assembly.loops import InnerLoop, make_loop
from backdoors.config import Config, check_run_name
from backdoors.errors import BackdoorsError, Diverged, RunError, RunFailed
from backdoors.hooks import Hook, TensorBoardHook
from backdoors.runs import (
    RunFolder,
    RunLock,
    create_run_folder,
    load_commit,
    load_into,
    save_commit,
    save_weights,
    state_of,
)
from backdoors.training.log import TrainLog


class Interrupted(Exception):  # noqa: N818 - reads as "the run was interrupted"
    """Raised after a run stopped on SIGINT/SIGTERM with a resumable checkpoint."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def run(config: Config, out: str | Path = "runs", name: str | None = None,
        hooks: Sequence[Hook] = (), quiet: bool = False) -> dict[str, Any]:
    """Train a fresh run; return its summary. The run folder is `out/NAME` when `name` is
    given (it must not exist), else `out/<config.name>-<timestamp>`."""
    if name is not None:
        check_run_name(name, "--name")
    comps = build(config)
    first = load_start_weights(config, comps)  # bad weights or data: no folder is made
    comps.task.train, comps.task.test  # noqa: B018
    resolved = resolved_config(config, comps)
    folder = create_run_folder(out, name or config.name, name is not None,
                               yaml.safe_dump(resolved, sort_keys=False))
    with RunLock(folder.path, "training"):
        lifecycle = Lifecycle(config, comps, folder, fingerprint(resolved), first=first)
        summary = lifecycle.go(hooks, quiet)
    return defend_all(folder, config.defenses, quiet) if config.defenses else summary


def resume(run_dir: str | Path, hooks: Sequence[Hook] = (), quiet: bool = False,
           overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Continue a run from its last checkpoint commit (or from the start, if it was
    killed before its first). `overrides` may move it (`task.data_dir=...`)."""
    folder = RunFolder.existing(run_dir)
    with RunLock(folder.path, "resuming"):
        try:
            status = folder.read_summary().get("status")
        except RunError:  # a damaged summary is re-made from the log
            status = None
        config = saved_config(folder, overrides)
        if status != "completed":
            threads = folder.threads()
            if threads is not None:  # float sums depend on the split over threads
                torch.set_num_threads(threads)
            comps = build(config, fresh=False)
            resolved = resolved_config(config, comps)
            summary = Lifecycle(config, comps, folder, fingerprint(resolved)).go(hooks, quiet)
    if status == "completed":  # killed while its defenses ran, or nothing left to do
        return _finish_defenses(folder, config, quiet)
    return defend_all(folder, config.defenses, quiet) if config.defenses else summary


def _finish_defenses(folder: RunFolder, config: Config, quiet: bool) -> dict[str, Any]:
    """A completed run killed while its `defenses:` ran: run the ones missing."""
    missing = [d for d in config.defenses
               if not (folder.path / "defenses" / defense_key(d) / "result.json").is_file()]
    if not missing:
        raise RunError(f"{folder.path} already completed; nothing to resume")
    return defend_all(folder, missing, quiet)


class Lifecycle:
    """Drives one run folder through an inner loop, unit by unit, commit by commit."""

    def __init__(self, config: Config, comps: Components, folder: RunFolder,
                 config_fingerprint: str, first: int | None | bool = False) -> None:
        """`first`: the start weights are loaded already and say which unit comes first
        (None: the loop's own first unit); False: not loaded yet."""
        self.config, self.comps, self.folder = config, comps, folder
        self.first = first
        self.fingerprint = {"config": config_fingerprint, "trigger": ""}
        self.summary: dict[str, Any] = {"status": "running", "name": config.name,
                                        "run_dir": str(folder.path),
                                        "fingerprint": config_fingerprint}
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"unit": None, "clean_accuracy": None}

    def go(self, hooks: Sequence[Hook], quiet: bool) -> dict[str, Any]:
        commit = load_commit(self.folder)
        if commit is not None and commit["fingerprint"]["config"] != self.fingerprint["config"]:
            raise RunError(f"{self.folder.path}/config.yaml changed since the run was trained; "
                           "restore it, or train a new run with the new config")
        self.folder.write_env(self.config.seed, str(self.comps.device), commit is not None)
        self.folder.write_summary(self.summary)
        all_hooks = list(hooks)
        with recording(self.folder, self.summary, all_hooks, self.config.train.lr):
            loop, start = self._prepare(commit)
            try:
                if self.config.train.tensorboard:
                    all_hooks.append(TensorBoardHook(self.folder.path / "tb"))
                if not quiet:
                    all_hooks.append(loop.console())
                for hook in all_hooks:
                    hook.on_start(self.folder.path, start, loop.global_step(start))
                log = TrainLog(self.folder, all_hooks, self.config.train.log_interval,
                               loop.steps_per_unit)
                for unit in range(start, loop.last + 1):
                    row = loop.run_unit(unit, log.on_step)
                    self._commit_unit(loop, unit, row)
                    scalars = loop.scalars(row)
                    for hook in all_hooks:
                        hook.on_epoch_end(unit, row, self.comps.model)
                        if scalars:
                            hook.on_scalars(loop.scalar_group, scalars, loop.global_step(unit))
            finally:  # a Ray engine's workers go whatever happens
                loop.close()
            self.summary.update(loop.summary(self.rows), status="completed")
        self.folder.write_summary(self.summary)
        return self.summary

    def _prepare(self, commit: dict[str, Any] | None) -> tuple[InnerLoop, int]:
        """Data, trigger and loop; then either the saved state or a first commit."""
        config, comps = self.config, self.comps
        data = training_data(config, comps, central=config.federated is None)
        self.fingerprint["trigger"] = trigger_fingerprint(comps.synthesizer)
        if commit is not None and commit["fingerprint"]["trigger"] != self.fingerprint["trigger"]:
            raise RunError(f"{self.folder.path}: the trigger re-made for resuming differs from "
                           "the one trained (another torch version or device?); start a new run")
        self.poisoned = data.poisoned
        self.summary["poisoned_samples"] = int(data.poisoned.sum())
        loop = make_loop(config, comps, data)
        if commit is not None:
            loop.start()
            return loop, self._restore(loop, commit)
        if self.folder.log_size() > 0:  # rows are logged only after the first commit
            raise RunError(f"{self.folder.path} has metrics but no checkpoints/commit.pt (was "
                           "it deleted?); it cannot be resumed, start a new run")
        if self.first is False:
            self.first = load_start_weights(config, comps)
        if start_path(config, comps) is None:  # from scratch: fit data-dependent layers
            prepare_model(comps.model, data.train)
        first = self.first or loop.first
        loop.start()
        random.seed(config.seed)
        self.folder.cut_log(0)
        write_artifact(self.folder, comps.synthesizer, config.attack.as_dict(),
                       data.poison_indices(), self.fingerprint)
        self._save_commit(loop, first - 1, self.folder.log_size())
        return loop, first

    def _restore(self, loop: InnerLoop, commit: dict[str, Any]) -> int:
        """Put the run back where its last commit left it."""
        self.folder.cut_log(commit["log_bytes"])
        load_into(self.comps.model, commit["weights"], f"{self.folder.checkpoints}/commit.pt")
        loop.load_state_dict(commit["loop"])
        torch.set_rng_state(commit["rng"]["torch"])
        random.setstate(commit["rng"]["python"])
        self.best = dict(commit["best"])
        self.rows = [r for r in self.folder.rows() if r.get("kind") == loop.unit]
        if self.rows:  # re-publish what a kill may have cut off after the commit
            save_weights(self.folder.checkpoints / "last.safetensors", commit["weights"])
            self.summary.update(loop.summary(self.rows))
            self.folder.write_summary(self.summary)
        return commit["unit"] + 1

    def _commit_unit(self, loop: InnerLoop, unit: int, row: dict[str, Any]) -> None:
        """Log the unit's row, then make it durable: snapshots first (re-made identically
        if a kill comes before the commit), the commit, then the derived files."""
        log_bytes = self.folder.log(row)
        self.rows.append(row)
        weights = state_of(self.comps.model)
        ckpt = self.folder.checkpoints
        best = self.best["clean_accuracy"]
        if best is None or row["clean_accuracy"] > best:
            self.best = {"unit": unit, "clean_accuracy": row["clean_accuracy"]}
            save_weights(ckpt / "best.safetensors", weights, {loop.unit: str(unit)})
        if unit in self.config.train.save_on_epochs:
            save_weights(ckpt / f"epoch_{unit}.safetensors", weights)
        rows = loop.poison_rows()
        if rows is not None and len(rows) != int(self.poisoned.sum()):
            self.poisoned = mask_of(rows, len(self.poisoned))
            self.summary["poisoned_samples"] = len(rows)
            write_artifact(self.folder, self.comps.synthesizer, self.config.attack.as_dict(),
                           rows, self.fingerprint)
        self._save_commit(loop, unit, log_bytes, weights)
        save_weights(ckpt / "last.safetensors", weights, {loop.unit: str(unit)})
        self.summary.update(loop.summary(self.rows))
        self.folder.write_summary(self.summary)

    def _save_commit(self, loop: InnerLoop, unit: int, log_bytes: int,
                     weights: dict[str, torch.Tensor] | None = None) -> None:
        save_commit(self.folder, {
            "unit": unit, "log_bytes": log_bytes,
            "weights": weights if weights is not None else state_of(self.comps.model),
            "loop": loop.state_dict(), "best": self.best, "fingerprint": self.fingerprint,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        })


class _Interrupt:
    """Turns SIGTERM into KeyboardInterrupt while training, so both leave a resumable run."""

    def __enter__(self) -> None:
        self.previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    @staticmethod
    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt


@contextmanager
def recording(folder: RunFolder, summary: dict[str, Any], hooks: list[Hook], lr: float
              ) -> Iterator[None]:
    """Record how the run ends: `interrupted` (SIGINT/SIGTERM, resumable) or `failed` with
    its error in summary.json; the hooks are always closed. `lr` is named when the run
    diverges."""
    try:
        with _Interrupt():
            yield
    except KeyboardInterrupt:
        _final(folder, summary, status="interrupted")
        raise Interrupted(folder.path) from None
    except Diverged as exc:
        message = f"training diverged: {exc.what} at {exc.where}; lower train.lr (now {lr:g})"
        _final(folder, summary, status="failed", error=message)
        raise RunFailed(f"{message} -> {folder.path}") from None
    except BaseException as exc:
        first = (str(exc).splitlines() or [""])[0]
        kind = "" if isinstance(exc, BackdoorsError) else f"{type(exc).__name__}: "
        _final(folder, summary, status="failed", error=f"{kind}{first}")
        raise
    finally:
        for hook in hooks:
            hook.on_end()


def _final(folder: RunFolder, summary: dict[str, Any], **fields: Any) -> None:
    """Write the final status; a second failure (a full disk) must not hide the first."""
    summary.update(fields)
    try:
        folder.write_summary(summary)
    except (BackdoorsError, OSError):
        pass
