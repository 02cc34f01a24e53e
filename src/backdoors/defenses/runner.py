"""Run a defense against a finished attack run and record what it achieved.

The runner rebuilds the attack artifact from the run folder (config, weights, the poisoned
training set re-created from its seeded streams), hands the defense only what it declared,
and measures detection (AUROC, TPR at 5% FPR; for defenses that remove or isolate
training samples, how many and their recall and precision), mitigation (clean accuracy,
ASR, RA before and after, DER) and cost (seconds, peak memory). Results go to the run's
summary.json under `defenses` and to defenses/<name>/ (result.json and PNG figures).
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.config import Config, from_dict, read_yaml
from backdoors.data.augment import random_crop_flip
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.defenses.base import (
    DEFENSES,
    DatasetSanitizer,
    Defense,
    DefenseData,
    DefenseResult,
    InputDetector,
    ModelInspector,
    ModelRepair,
    TrainingBudget,
    TrainingDefense,
)
from backdoors.defenses.scores import auroc, der, tpr_at_fpr
from backdoors.errors import ConfigError, DataError, RunError
from backdoors.metrics import evaluate
from backdoors.models import MODELS
from backdoors.runs import Run, load_weights
from backdoors.training.optim import resolve_device

CLEAN_STREAM, DEFENSE_STREAM = 11, 12
FPR = 0.05


def clean_budget(train: Dataset, poison_idx: Tensor, fraction: float, seed: int) -> ArrayDataset:
    """`fraction` of the training set drawn from samples the attack did not touch."""
    if not isinstance(train, ArrayDataset):
        raise DataError("defenses need an in-memory training set (streaming tasks: soon)")
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[poison_idx] = False
    pool = keep.nonzero().flatten()
    g = torch.Generator().manual_seed(seed * 1000 + CLEAN_STREAM)
    k = max(1, int(round(fraction * len(train))))
    return train.subset(pool[torch.randperm(len(pool), generator=g)[:k]].sort().values)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class Artifact:
    """A finished attack run, re-opened: config, components, model and datasets."""

    def __init__(self, run_dir: str | Path) -> None:
        from backdoors.experiment import build, evaluation_loaders, poisoned_training_set

        self.path = Path(run_dir)
        if not (self.path / "config.yaml").is_file():
            raise RunError(f"{self.path} is not a run folder (no config.yaml)")
        weights = self.path / "checkpoints" / "last.safetensors"
        if not weights.is_file():
            raise RunError(f"{self.path} has no trained model (checkpoints/last.safetensors)")
        self.config: Config = from_dict(read_yaml(self.path / "config.yaml"))
        self.comps = build(self.config)
        self.device = resolve_device(self.config.train.device)
        self.model = self.comps.model.to(self.device)
        self.model.load_state_dict(load_weights(weights))
        self.model.eval()
        self.train, self.poison_idx = poisoned_training_set(self.config, self.comps)
        self.test_loader, self.backdoor_loader = evaluation_loaders(
            self.comps, self.device, self.config.train.test_batch_size)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        from backdoors.experiment import EVAL_STREAM

        gen = torch.Generator().manual_seed(self.config.seed * 1000 + EVAL_STREAM)
        return evaluate(model, self.test_loader, self.comps.synthesizer, gen,
                        self.backdoor_loader)

    def fresh_model(self) -> nn.Module:
        """The run's architecture with the weights its training started from: built under
        the run's seed exactly as `experiment.build` does (a `pretrained` start is not
        reloaded), without disturbing the global random state."""
        cfg, task = self.config, self.comps.task
        name = cfg.model.name if cfg.model else task.default_model
        kwargs = cfg.model.kwargs if cfg.model else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = MODELS.build(name, kwargs, "model", num_classes=task.num_classes,
                                 input_shape=task.input_shape, mean=task.mean, std=task.std)
        return model.to(self.device)

    def budget(self) -> TrainingBudget:
        """The run's own training budget, augmentation included."""
        augment = None
        if self.comps.task.augment:
            augment = lambda x, g: random_crop_flip(x, generator=g)  # noqa: E731
        return TrainingBudget(self.config.train, augment)


def check_fits(defense: Defense, config: Config, where: str) -> None:
    """Refuse a defense that needs the central training set on a federated run: no server
    holds the participants' (partly poisoned) data, and the poison indices a dataset-level
    score would be judged against are the attackers' own shares, not a central draw."""
    if config.federated is not None and defense.uses_training_set:
        raise ConfigError(f"{where}: {defense.name} ({defense.stage} stage) needs the central "
                          "training set, which a federated run does not have; use an input, "
                          "inspection or repair defense (e.g. strip, neural_cleanse, "
                          "fine_pruning)")


def run_defense(artifact: Artifact, defense: Defense) -> dict[str, Any]:
    """Apply one defense to the artifact's model and measure it."""
    cfg, comps = artifact.config, artifact.comps
    check_fits(defense, cfg, f"defense '{defense.name}'")
    data = DefenseData(
        clean=clean_budget(comps.task.train, artifact.poison_idx, defense.clean_fraction,
                           cfg.seed),
        num_classes=comps.task.num_classes,
        input_shape=comps.task.input_shape,
        device=artifact.device,
        generator=torch.Generator().manual_seed(cfg.seed * 1000 + DEFENSE_STREAM),
        train=artifact.train if defense.uses_training_set else None,
        batch_size=cfg.train.test_batch_size,
    )
    before = artifact.evaluate(artifact.model)
    model = copy.deepcopy(artifact.model)
    if artifact.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(artifact.device)
    start = time.perf_counter()
    out: dict[str, Any] = {"defense": defense.name, "stage": defense.stage,
                           "clean_samples": len(data.clean), "before": _figures(before)}
    extra = DefenseResult()
    if isinstance(defense, InputDetector):
        out.update(_input_detection(defense, model, data, artifact))
    elif isinstance(defense, DatasetSanitizer):
        scores = defense.score(model, data).cpu()
        extra.figures.update(defense.last_result.figures)
        poisoned = _poison_mask(len(artifact.train), artifact.poison_idx)
        out.update(_detection(scores, poisoned))
        out["recall_at_1_5x"] = _recall_at(scores, artifact.poison_idx, 1.5)
        out.update(_removal(defense.removed(scores).cpu(), poisoned, "removed"))
        extra.artifacts["scores"] = scores
    elif isinstance(defense, TrainingDefense):
        trained = defense.train(artifact.fresh_model(), data, artifact.budget())
        model = trained.model.eval()
        poisoned = _poison_mask(len(artifact.train), artifact.poison_idx)
        if trained.scores is not None:
            out.update(_detection(trained.scores.cpu(), poisoned))
            extra.artifacts["scores"] = trained.scores.cpu()
        if trained.flagged is not None:
            out.update(_removal(trained.flagged.cpu(), poisoned, "isolated"))
        extra.figures.update(trained.result.figures)
        extra.artifacts.update(trained.result.artifacts)
        out.update(_mitigation(artifact, before, model))
    if isinstance(defense, ModelInspector):
        index, extra = defense.inspect(model, data)
        target = comps.synthesizer.target
        flagged = extra.figures.pop("flagged", (index > 2).nonzero().flatten().tolist())
        out.update(anomaly_index=index.tolist(), flagged_classes=flagged,
                   target_flagged=target in flagged, target_anomaly_index=float(index[target])
                   if target < len(index) else None)
    if isinstance(defense, ModelRepair) and getattr(defense, "repairs", True):
        model, repaired = defense.repair(model, data)
        extra.figures.update(repaired.figures)
        extra.artifacts.update(repaired.artifacts)
        out.update(_mitigation(artifact, before, model))
    out["seconds"] = time.perf_counter() - start
    out["peak_memory_mb"] = _peak_memory_mb(artifact.device)
    out.update({k: v for k, v in extra.figures.items()})
    _write(artifact, defense.name, out, extra)
    return out


def _mitigation(artifact: Artifact, before: dict[str, Any], model: nn.Module
                ) -> dict[str, Any]:
    """Figures of the defended model and the DER against the attacked one."""
    after = artifact.evaluate(model)
    return {"after": _figures(after),
            "der": der(before["clean_accuracy"], after["clean_accuracy"], before["asr"],
                       after["asr"])}


def _figures(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in ("clean_accuracy", "asr", "robust_accuracy",
                                        "backdoor_accuracy")}


def _poison_mask(n: int, idx: Tensor) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


def _detection(scores: Tensor, positive: Tensor) -> dict[str, float]:
    return {"auroc": auroc(scores, positive), "tpr_at_5_fpr": tpr_at_fpr(scores, positive, FPR)}


def _removal(flagged: Tensor, poisoned: Tensor, key: str) -> dict[str, Any]:
    """How many samples a defense set apart, the share of the poisoned ones among them
    (recall: of all poisoned; precision: of those set apart); None where undefined."""
    hits = int((flagged & poisoned).sum())
    n, n_poisoned = int(flagged.sum()), int(poisoned.sum())
    return {key: n, f"{key}_recall": hits / n_poisoned if n_poisoned else None,
            f"{key}_precision": hits / n if n else None}


def _recall_at(scores: Tensor, idx: Tensor, factor: float) -> float | None:
    """Share of poisoned samples among the top factor * |poisoned| scores (the removal
    budget of spectral signatures)."""
    if len(idx) == 0:
        return None
    k = min(len(scores), int(round(factor * len(idx))))
    top = set(scores.topk(k).indices.tolist())
    return sum(int(i) in top for i in idx.tolist()) / len(idx)


@torch.no_grad()
def _input_detection(defense: InputDetector, model: nn.Module, data: DefenseData,
                     artifact: Artifact) -> dict[str, Any]:
    """Score clean test inputs against triggered test inputs whose label is not the target."""
    with torch.enable_grad():
        defense.fit(model, data)
    synth = artifact.comps.synthesizer
    gen = torch.Generator().manual_seed(artifact.config.seed * 1000 + DEFENSE_STREAM)
    clean_scores, trig_scores = [], []
    for batch in artifact.test_loader:
        clean_scores.append(defense.score(model, batch.inputs).cpu())
    source = artifact.backdoor_loader or artifact.test_loader
    for batch in source:
        keep = synth.counted(batch) & synth.eligible(batch)
        if int(keep.sum()) == 0:
            continue
        triggered = synth.apply(batch.select(keep), 1.0, gen)
        trig_scores.append(defense.score(model, triggered.inputs).cpu())
    scores = torch.cat(clean_scores + trig_scores)
    positive = torch.cat([torch.zeros(sum(len(s) for s in clean_scores), dtype=torch.bool),
                          torch.ones(sum(len(s) for s in trig_scores), dtype=torch.bool)])
    return _detection(scores, positive)


def _write(artifact: Artifact, name: str, result: dict[str, Any], extra: DefenseResult) -> None:
    folder = artifact.path / "defenses" / name
    folder.mkdir(parents=True, exist_ok=True)
    run = Run(artifact.path)
    run.write_json(f"defenses/{name}/result.json", result)
    from backdoors.defenses.figures import save_artifacts

    save_artifacts(folder, extra.artifacts, result)
    summary = run.read_summary()
    summary.setdefault("defenses", {})[name] = result
    run.write_summary(summary)


def defend(run_dir: str | Path, name: str, kwargs: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """Run defense `name` (with constructor `kwargs`) on the finished run in `run_dir`."""
    defense = DEFENSES.build(name, kwargs or {}, f"defense '{name}'")
    artifact = Artifact(run_dir)
    if (artifact.path / "summary.json").is_file():
        status = json.loads((artifact.path / "summary.json").read_text()).get("status")
        if status != "completed":
            raise RunError(f"{artifact.path} did not complete (status {status}); finish it "
                           f"with: backdoors train --resume {artifact.path}")
    return run_defense(artifact, defense)
