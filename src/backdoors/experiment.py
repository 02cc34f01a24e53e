"""The only wiring code: config -> task -> model -> synthesizer -> attack -> train ->
evaluate -> record. Everything else is a component that knows nothing of the others."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from backdoors.attacks import ATTACKS, Attack
from backdoors.config import Config, from_dict, read_yaml
from backdoors.data import TASKS, Loader, Task
from backdoors.data.augment import random_crop_flip
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.defenses import DEFENSES
from backdoors.defenses.runner import check_fits
from backdoors.errors import ConfigError, RunError
from backdoors.hooks import ConsoleHook, Hook, TensorBoardHook
from backdoors.models import MODELS
from backdoors.runs import Run, load_weights, new_run_dir
from backdoors.synthesizers import SYNTHESIZERS, Synthesizer
from backdoors.training.accounting import epsilon, sample_rate
from backdoors.training.dp import DPSGD
from backdoors.training.optim import make_optimizer, make_scheduler, resolve_device
from backdoors.training.trainer import EpochStats, Trainer

# Independent random streams derived from the seed, so that changing one part of a run
# (e.g. the number of evaluation batches) never shifts another (e.g. the poison subset).
POISON_STREAM, TRAIN_STREAM, EVAL_STREAM, TRIGGER_STREAM = 1, 2, 3, 4
DP_NOISE_STREAM = 5
PRETRAINED_DIR = Path("~/.cache/backdoors/pretrained").expanduser()


@dataclass
class Components:
    task: Task
    model: nn.Module
    synthesizer: Synthesizer
    attack: Attack


def build(config: Config) -> Components:
    """Construct and cross-check every component; loads no data."""
    task = TASKS.build(config.task.name, config.task.kwargs, "task")
    model_cfg = config.model
    model_name = model_cfg.name if model_cfg else task.default_model
    model_kwargs = model_cfg.kwargs if model_cfg else {}
    torch.manual_seed(config.seed)  # model initialisation is part of the seeded run
    model = MODELS.build(model_name, model_kwargs, "model", num_classes=task.num_classes,
                         input_shape=task.input_shape, mean=task.mean, std=task.std)
    synthesizer = SYNTHESIZERS.build(config.synthesizer.name, config.synthesizer.kwargs,
                                     "synthesizer")
    try:
        synthesizer.bind(task.input_shape, task.num_classes)
    except ValueError as exc:
        raise ConfigError(f"synthesizer ({config.synthesizer.name}): {exc}") from None
    attack = ATTACKS.build(config.attack.name, config.attack.kwargs, "attack")
    attack.bind(synthesizer, model)
    if config.federated is not None:
        config.federated.check_train(config.train)
    if config.train.dp:  # DP-SGD wraps the attack's step; refuses what it cannot run
        attack = DPSGD(attack, model, config.train.dp_clip, config.train.dp_sigma,
                       seed=config.seed * 1000 + DP_NOISE_STREAM)
    for i, d in enumerate(config.defenses):
        check_fits(DEFENSES.build(d.name, d.kwargs, f"defenses[{i}]"), config, f"defenses[{i}]")
    return Components(task, model, synthesizer, attack)


def resolved_config(config: Config, comps: Components) -> dict[str, Any]:
    """The config with every constructor default written out (for config.yaml)."""
    out = config.as_dict()
    if not out["defenses"]:
        del out["defenses"]
    if config.federated is not None:
        out["federated"] = config.federated.resolved()
    for section, registry in (("task", TASKS), ("model", MODELS),
                              ("synthesizer", SYNTHESIZERS), ("attack", ATTACKS)):
        given = out[section] or {"name": comps.task.default_model}
        params = registry.parameters(given["name"])
        defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
        out[section] = {"name": given["name"], **defaults,
                        **{k: v for k, v in given.items() if k != "name"}}
    return out


def _pretrained_path(value: str, model_name: str) -> Path:
    if value != "auto":
        return Path(value).expanduser()
    path = PRETRAINED_DIR / f"{model_name}.safetensors"
    if not path.is_file():
        raise ConfigError(f"train.pretrained: auto found no local weights for '{model_name}' "
                          f"at {path}; download them there or set train.pretrained: PATH")
    return path


def _load_into(model: nn.Module, path: Path, what: str) -> dict[str, torch.Tensor]:
    state = load_weights(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{what}: {path} does not fit the model "
                          f"({str(exc).splitlines()[1].strip()})") from None
    return state


def _resume_model(model: nn.Module, path_text: str) -> int:
    """Load a legacy/native checkpoint; return the epoch it finished (0 if unknown)."""
    path = Path(path_text).expanduser()
    if not path.exists() and (Path("saved_models") / path_text).exists():
        path = Path("saved_models") / path_text  # Backdoors 101 resolved names there
    _load_into(model, path, "train.resume_model")
    if path.suffix == ".safetensors":
        return 0
    data = torch.load(path, map_location="cpu", weights_only=True)
    return int(data.get("epoch", 0)) if isinstance(data, dict) else 0


def _on_device(ds: Dataset, device: torch.device) -> Dataset:
    return ds.to(device) if isinstance(ds, ArrayDataset) and device.type != "cpu" else ds


def clean_training_set(config: Config, comps: Components) -> Dataset:
    """Prepare the trigger on the clean training set (seeded stream) and drop the rows the
    trigger takes out of the main task."""
    trigger_gen = torch.Generator().manual_seed(config.seed * 1000 + TRIGGER_STREAM)
    comps.synthesizer.prepare(comps.task.train, trigger_gen)
    return _without(comps.task.train, comps.synthesizer.excluded(comps.task.train, "train"))


def poisoned_training_set(config: Config, comps: Components) -> tuple[Dataset, torch.Tensor]:
    """The clean training set poisoned by the attack; both steps draw from their own seeded
    streams, so this is reproducible (resume, defenses)."""
    train = clean_training_set(config, comps)
    poison_gen = torch.Generator().manual_seed(config.seed * 1000 + POISON_STREAM)
    return comps.attack.poison_training_set(train, poison_gen)


def _without(ds: Dataset, drop: torch.Tensor | None) -> Dataset:
    """`ds` minus the rows in `drop` (backdoor inputs that leave the main task)."""
    if drop is None or len(drop) == 0:
        return ds
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[drop] = False
    rows = keep.nonzero().flatten()
    if isinstance(ds, ArrayDataset):
        return ds.subset(rows)
    return torch.utils.data.Subset(ds, rows.tolist())  # type: ignore[return-value]


def evaluation_loaders(comps: Components, device: torch.device, batch_size: int
                 ) -> tuple[Loader, Loader | None]:
    """The clean test loader, and a loader of the trigger's own backdoor inputs if any."""
    workers = getattr(comps.task, "num_workers", 0)
    test_set = _without(comps.task.test, comps.synthesizer.excluded(comps.task.test, "test"))
    test = Loader(_on_device(test_set, device), batch_size, device, num_workers=workers)
    own = comps.synthesizer.backdoor_test_set()
    return test, None if own is None else Loader(_on_device(own, device), batch_size, device)


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
def recording(run_: Run, summary: dict[str, Any], hooks: Sequence[Hook]) -> Iterator[None]:
    """Run a training loop with SIGTERM turned into an interrupt: an interrupted or failed
    loop leaves its status in summary.json, and the hooks are always closed."""
    try:
        with _Interrupt():
            yield
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        run_.write_summary(summary)
        raise Interrupted(run_.path) from None
    except BaseException as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        run_.write_summary(summary)
        raise
    finally:
        for hook in hooks:
            hook.on_end()


class Interrupted(Exception):  # noqa: N818 - reads as "the run was interrupted"
    """Raised after a run stopped on SIGINT/SIGTERM with a resumable checkpoint."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def run(
    config: Config,
    out: str | Path = "runs",
    name: str | None = None,
    hooks: Sequence[Hook] = (),
    quiet: bool = False,
) -> dict[str, Any]:
    """Train a fresh run; return its summary. The run folder is `out/NAME` when `name` is
    given (it must not exist), else `out/<config.name>-<timestamp>`."""
    comps = build(config)
    comps.task.train, comps.task.test  # noqa: B018 - load data before making a run folder
    path = new_run_dir(out, name or config.name, exact=name is not None)
    run_ = Run(path)
    run_.write_config(resolved_config(config, comps))
    if config.federated is not None:
        from backdoors.federated.simulation import run_federated

        summary = run_federated(config, comps, run_, None, hooks, quiet)
    else:
        summary = _execute(config, comps, run_, None, hooks, quiet)
    return _run_defenses(config, run_, summary, quiet)


def resume(run_dir: str | Path, hooks: Sequence[Hook] = (), quiet: bool = False
           ) -> dict[str, Any]:
    """Continue a run from its last finished epoch, with optimizer, scheduler, RNG state."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise RunError(f"{path} is not a run folder (no config.yaml)")
    run_ = Run(path)
    summary = run_.read_summary()
    if summary.get("status") == "completed":
        raise RunError(f"{path} already completed; nothing to resume")
    config = from_dict(read_yaml(path / "config.yaml"))
    comps = build(config)
    state = run_.load_state()
    if config.federated is not None:
        from backdoors.federated.simulation import run_federated

        summary = run_federated(config, comps, run_, state, hooks, quiet)
    else:
        summary = _execute(config, comps, run_, state, hooks, quiet)
    return _run_defenses(config, run_, summary, quiet)


def _run_defenses(config: Config, run_: Run, summary: dict[str, Any], quiet: bool
                  ) -> dict[str, Any]:
    """Run the config's `defenses:` on the finished run; results land in summary.json."""
    if not config.defenses:
        return summary
    from backdoors.defenses.runner import Artifact, run_defense
    from backdoors.defenses.scores import format_result

    artifact = Artifact(run_.path)
    for d in config.defenses:
        result = run_defense(artifact, DEFENSES.build(d.name, d.kwargs, "defenses"))
        if not quiet:
            print(format_result(result), flush=True)
    return run_.read_summary()


def _execute(
    config: Config,
    comps: Components,
    run_: Run,
    state: dict[str, Any] | None,
    hooks: Sequence[Hook],
    quiet: bool,
) -> dict[str, Any]:
    tc = config.train
    device = resolve_device(tc.device)
    random.seed(config.seed)
    model = comps.model.to(device)
    start_epoch = tc.start_epoch
    if state is None:
        if tc.pretrained:
            model_name = config.model.name if config.model else comps.task.default_model
            _load_into(model, _pretrained_path(tc.pretrained, model_name), "train.pretrained")
        if tc.resume_model:
            start_epoch = max(start_epoch, _resume_model(model, tc.resume_model) + 1)
    run_.write_env(config.seed, str(device), resumed=state is not None)
    comps.attack.start(model)

    train_set, poison_idx = poisoned_training_set(config, comps)
    trigger = comps.synthesizer.state_tensors()
    if trigger:
        save_file({k: v.detach().contiguous().cpu() for k, v in trigger.items()},
                  str(run_.path / "trigger.safetensors"))
    run_.write_json("attack.json", {
        "synthesizer": comps.synthesizer.spec(),
        "attack": config.attack.as_dict(),
        "poisoned_samples": len(poison_idx),
        "poison_indices": poison_idx.tolist(),
    })
    train_gen = torch.Generator().manual_seed(config.seed * 1000 + TRAIN_STREAM)
    augment = (lambda x, g: random_crop_flip(x, generator=g)) if comps.task.augment else None
    train_loader = Loader(_on_device(train_set, device), tc.batch_size, device, shuffle=True,
                          generator=train_gen, augment=augment, max_batches=tc.max_batches,
                          num_workers=getattr(comps.task, "num_workers", 0))
    test_loader, backdoor_loader = evaluation_loaders(comps, device, tc.test_batch_size)
    optimizer = make_optimizer(model, tc)
    scheduler = make_scheduler(optimizer, tc)
    best = -1.0
    history: list[float] = []
    if state is not None:
        model.load_state_dict(load_weights(run_.checkpoints / "last.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        train_gen.set_state(state["train_generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        comps.attack.load_state_dict(state["attack"])
        start_epoch, best = state["epoch"] + 1, state["best_clean_accuracy"]
        history = list(state["epoch_seconds"])
        run_.truncate_after(state["epoch"])
    elif run_.rows():
        raise RunError(f"{run_.path} has metrics but no checkpoint; start a new run")

    trainer = Trainer(model, comps.attack, optimizer, scheduler, train_loader, test_loader,
                      comps.synthesizer, train_gen,
                      eval_seed=config.seed * 1000 + EVAL_STREAM, progress=tc.progress,
                      backdoor_loader=backdoor_loader)
    all_hooks: list[Hook] = list(hooks)
    if tc.tensorboard:
        all_hooks.append(TensorBoardHook(run_.path / "tb"))
    if not quiet:
        all_hooks.append(ConsoleHook(tc.epochs))
    steps_per_epoch = len(train_loader)
    summary: dict[str, Any] = {"status": "running", "name": config.name,
                               "run_dir": str(run_.path), "poisoned_samples": len(poison_idx)}
    last_row: dict[str, Any] = {}
    for hook in all_hooks:
        hook.on_start(run_.path, start_epoch, (start_epoch - 1) * steps_per_epoch)
    log = _TrainLog(run_, all_hooks, tc.log_interval, steps_per_epoch)
    with recording(run_, summary, all_hooks):
        for epoch in range(start_epoch, tc.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            stats = trainer.train_epoch(epoch, log.on_step)
            metrics = trainer.evaluate()
            history.append(stats.seconds)
            last_row = _epoch_row(epoch, lr, stats, metrics)
            if isinstance(comps.attack, DPSGD):
                last_row["dp_epsilon"] = epsilon(
                    tc.dp_sigma, sample_rate(tc.batch_size, len(train_set)),
                    comps.attack.steps, tc.dp_delta)
                last_row["dp_delta"] = tc.dp_delta
            best = _checkpoint(run_, model, epoch, last_row, best, tc.save_on_epochs)
            run_.save_state({
                "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler else None,
                "train_generator": train_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(), "attack": comps.attack.state_dict(),
                "best_clean_accuracy": best, "epoch_seconds": history,
            })
            run_.log(last_row)
            summary.update(_summary_figures(last_row, epoch, history, best))
            run_.write_summary(summary)
            for hook in all_hooks:
                hook.on_epoch_end(epoch, last_row, model)
        summary["status"] = "completed"
        if not last_row and state is None:
            summary.update(_summary_figures(
                {**trainer.evaluate(), "epoch": start_epoch - 1}, start_epoch - 1, history, best))
    run_.write_summary(summary)
    return summary


class _TrainLog:
    """Averages step reports over `interval` steps, then logs a row and tells the hooks."""

    def __init__(self, run_: Run, hooks: list[Hook], interval: int, steps_per_epoch: int):
        self.run, self.hooks, self.interval, self.per_epoch = run_, hooks, interval, steps_per_epoch
        self.losses: dict[str, list[float]] = {}
        self.scales: dict[str, list[float]] = {}

    def on_step(self, epoch: int, step: int, report: Any) -> None:
        for k, v in report.losses.items():
            self.losses.setdefault(k, []).append(v)
        for k, v in report.scales.items():
            self.scales.setdefault(k, []).append(v)
        if (step + 1) % self.interval and step + 1 != self.per_epoch:
            return
        mean = lambda d: {k: sum(v) / len(v) for k, v in d.items()}  # noqa: E731
        losses, scales = mean(self.losses), mean(self.scales)
        global_step = (epoch - 1) * self.per_epoch + step + 1
        self.run.log({"kind": "train", "epoch": epoch, "step": step + 1,
                      "global_step": global_step, "loss": losses, "scale": scales})
        for hook in self.hooks:
            hook.on_train_log(global_step, losses, scales)
        self.losses, self.scales = {}, {}


def _epoch_row(epoch: int, lr: float, stats: EpochStats, metrics: dict[str, float]
               ) -> dict[str, Any]:
    return {"kind": "epoch", "epoch": epoch, "lr": lr, "train_seconds": stats.seconds,
            "train_samples": stats.samples, "train_loss": stats.losses,
            "train_scale": stats.scales, **metrics}


def _checkpoint(run_: Run, model: nn.Module, epoch: int, row: dict[str, Any], best: float,
                save_on: list[int]) -> float:
    run_.save_weights(model, "last")
    if epoch in save_on:
        run_.save_weights(model, f"epoch_{epoch}")
    if row["clean_accuracy"] > best:
        best = row["clean_accuracy"]
        run_.save_weights(model, "best")
    return best


def _summary_figures(row: dict[str, Any], epoch: int, history: list[float], best: float
                     ) -> dict[str, Any]:
    keys = ("clean_accuracy", "asr", "backdoor_accuracy", "robust_accuracy", "clean_loss",
            "backdoor_loss", "variants", "dp_epsilon", "dp_delta")
    return {**{k: row[k] for k in keys if k in row}, "epochs": epoch,
            "best_clean_accuracy": best if best >= 0 else row.get("clean_accuracy"),
            "seconds_per_epoch": sum(history) / len(history) if history else None}
