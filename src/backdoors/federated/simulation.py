"""Federated learning simulation with backdoor attackers ("How To Backdoor Federated
Learning", Bagdasaryan et al., AISTATS 2020, arXiv 1807.00459; Backdoors 101's fl mode).

A round: sample `per_round` of the `participants`; each trains `local_epochs` from the
global weights on its own share of the training set; compromised ones train with the
config's synthesizer and attack and multiply their update by `weight_scale`; the
aggregator turns the updates into the change of the global model; the global model is
evaluated (clean accuracy, ASR) and the round is logged with every update's norm, how the
aggregator treated it, and detection precision / recall against the known attackers.

Every random choice of round r (who is sampled, each client's shuffling, the server's
noise) is drawn from a generator seeded by (seed, r, participant), so a resumed run
repeats an uninterrupted one without saving generator states.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from backdoors.attacks import ATTACKS
from backdoors.config import Config
from backdoors.data.dataset import ArrayDataset
from backdoors.errors import ConfigError, RunError
from backdoors.experiment import (
    EVAL_STREAM,
    POISON_STREAM,
    Components,
    _load_into,
    _pretrained_path,
    _resume_model,
    clean_training_set,
    evaluation_loaders,
    recording,
)
from backdoors.federated.aggregators import Aggregator, RoundContext
from backdoors.federated.clients import LocalPlan, LocalTraining
from backdoors.federated.outputs import RoundConsole, add_federated_scalars, detection
from backdoors.federated.outputs import summary_figures as _figures
from backdoors.federated.partition import dirichlet_split, iid_split
from backdoors.federated.settings import FederatedConfig
from backdoors.federated.updates import FlatModel, mean_buffers
from backdoors.hooks import Hook, TensorBoardHook
from backdoors.metrics import evaluate
from backdoors.runs import Run
from backdoors.training.optim import make_optimizer, resolve_device

PARTITION_STREAM, SAMPLE_STREAM, CLIENT_STREAM, SERVER_STREAM = 21, 22, 23, 24


def stream(*parts: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (stable across Python versions)."""
    seed = 0
    for x in parts:
        seed = (seed * 1_000_003 + x) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def split(train: ArrayDataset, fc: FederatedConfig, seed: int) -> list[Tensor]:
    """Each participant's training-set indices."""
    gen = stream(seed, PARTITION_STREAM)
    if fc.split == "dirichlet":
        return dirichlet_split(train.labels, fc.participants, fc.alpha, gen)
    return iid_split(len(train), fc.participants, gen)


def sample_round(fc: FederatedConfig, seed: int, round_: int) -> tuple[list[int], list[bool]]:
    """The participants of a round, in sampling order, and which of them attack.

    As in Backdoors 101: with `attack_round` the first `adversaries` sampled participants
    attack in that round only; otherwise ids 0..adversaries-1 attack whenever sampled.
    """
    order = torch.randperm(fc.participants, generator=stream(seed, SAMPLE_STREAM, round_))
    sampled = order[: fc.per_round].tolist()
    if fc.attack_round is not None:
        bad = [round_ == fc.attack_round and i < fc.adversaries for i in range(len(sampled))]
    else:
        bad = [pid < fc.adversaries for pid in sampled]
    return sampled, bad


@dataclass
class Population:
    """Every participant's local data (on the training device) and training-set indices,
    plus the poisoned local sets of the compromised ones, made on first use (on the CPU,
    like the centralized training set, then moved)."""

    train: ArrayDataset
    indices: list[Tensor]
    comps: Components
    seed: int
    device: torch.device

    def __post_init__(self) -> None:
        on_device = self.train.to(self.device) if self.device.type != "cpu" else self.train
        self.data = [on_device.subset(p.to(self.device)) for p in self.indices]
        self.poisoned: dict[int, tuple[ArrayDataset, Tensor]] = {}

    def attacker_data(self, pid: int) -> ArrayDataset:
        if pid not in self.poisoned:
            gen = stream(self.seed, POISON_STREAM, pid)
            local = self.train.subset(self.indices[pid])
            ds, idx = self.comps.attack.poison_training_set(local, gen)
            if not isinstance(ds, ArrayDataset):
                raise ConfigError(f"attack '{self.comps.attack.name}' gave a streaming "
                                  "dataset; federated clients need in-memory data")
            on_device = ds.to(self.device) if self.device.type != "cpu" else ds
            self.poisoned[pid] = (on_device, self.indices[pid][idx.cpu()])
        return self.poisoned[pid][0]

    def poison_indices(self) -> list[int]:
        """Training-set indices poisoned by any attacker so far."""
        found = [idx for _, idx in self.poisoned.values()]
        return sorted(torch.cat(found).tolist()) if found else []


def run_federated(
    config: Config,
    comps: Components,
    run_: Run,
    state: dict[str, Any] | None,
    hooks: Sequence[Hook] = (),
    quiet: bool = False,
) -> dict[str, Any]:
    """Simulate `federated.rounds` rounds (from the last finished one when `state` is a
    resume state); write rows, checkpoints and the summary; return the summary."""
    fc, tc = config.federated, config.train
    assert fc is not None
    device = resolve_device(tc.device)
    model = comps.model.to(device)
    start_round = 1
    if state is None and tc.pretrained:
        model_name = config.model.name if config.model else comps.task.default_model
        _load_into(model, _pretrained_path(tc.pretrained, model_name), "train.pretrained")
    if state is None and tc.resume_model:
        start_round = _resume_model(model, tc.resume_model) + 1
    run_.write_env(config.seed, str(device), resumed=state is not None)

    train = clean_training_set(config, comps)
    if not isinstance(train, ArrayDataset):
        raise ConfigError(f"federated training needs an in-memory task; '{config.task.name}' "
                          "streams its images")
    population = Population(train, split(train, fc, config.seed), comps, config.seed, device)
    test_loader, backdoor_loader = evaluation_loaders(comps, device, tc.test_batch_size)
    flat = FlatModel(model)
    local = LocalTraining(flat, make_optimizer(model, tc), test_loader, tc.batch_size, device,
                          comps.task.augment, tc.max_batches)
    honest_attack = ATTACKS.build("none", {}, "attack")
    honest_attack.bind(comps.synthesizer, model)
    plans = (LocalPlan(honest_attack, fc.local_epochs, tc.lr),
             LocalPlan(comps.attack, fc.attacker_local_epochs or fc.local_epochs,
                       fc.attacker_lr or tc.lr))
    aggregator = fc.build_aggregator()
    best = -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        aggregator.load_state_dict(state["aggregator"])
        comps.attack.load_state_dict(state["attack"])
        start_round, best = state["round"] + 1, state["best_clean_accuracy"]
        run_.truncate_after(state["round"])
    elif run_.rows():
        raise RunError(f"{run_.path} has metrics but no checkpoint; start a new run")
    rows = [r for r in run_.rows() if r.get("kind") == "round"]

    all_hooks: list[Hook] = list(hooks)
    if tc.tensorboard:
        all_hooks.append(TensorBoardHook(run_.path / "tb"))
    if not quiet:
        all_hooks.append(RoundConsole(fc.rounds))
    summary: dict[str, Any] = {"status": "running", "name": config.name,
                               "run_dir": str(run_.path), "aggregator": fc.aggregator.name}
    _write_trigger(run_, comps, config, population)
    server = _Server(config, comps, flat, local, plans, aggregator, population, test_loader,
                     backdoor_loader)
    for hook in all_hooks:  # a resumed run's TensorBoard drops events of unfinished rounds
        hook.on_start(run_.path, start_round, start_round if state is not None else 0)
    with recording(run_, summary, all_hooks):
        for round_ in range(start_round, fc.rounds + 1):
            row = server.play(round_)
            rows.append(row)
            run_.log(row)  # before the state: a resume truncates rows past the state
            best = _checkpoint(run_, model, row, best, tc.save_on_epochs)
            # The state carries its own copy of the global model, so a kill between
            # two writes never pairs one round's weights with another's state.
            run_.save_state({"round": round_, "best_clean_accuracy": best,
                             "model": {k: v.detach().cpu()
                                       for k, v in model.state_dict().items()},
                             "aggregator": aggregator.state_dict(),
                             "attack": comps.attack.state_dict()})
            if row["attackers"]:
                _write_trigger(run_, comps, config, population)
            summary.update(_figures(rows))
            run_.write_summary(summary)
            for hook in all_hooks:
                hook.on_epoch_end(round_, row, model)
            add_federated_scalars(all_hooks, row)
        summary["status"] = "completed"
    run_.write_summary(summary)
    return summary


class _Server:
    """Plays rounds: local training of the sampled clients, aggregation, evaluation."""

    def __init__(self, config: Config, comps: Components, flat: FlatModel,
                 local: LocalTraining, plans: tuple[LocalPlan, LocalPlan],
                 aggregator: Aggregator, population: Population, test_loader: Any,
                 backdoor_loader: Any) -> None:
        self.config, self.comps, self.flat, self.local = config, comps, flat, local
        self.plans, self.aggregator, self.population = plans, aggregator, population
        self.test_loader, self.backdoor_loader = test_loader, backdoor_loader
        self.fc: FederatedConfig = config.federated  # type: ignore[assignment]
        device = flat.params[0].device
        # One [K, P] buffer for the round's updates, reused every round.
        self.updates = torch.empty(self.fc.per_round, flat.size, device=device)
        self.head = flat.head()

    def play(self, round_: int) -> dict[str, Any]:
        start = time.perf_counter()
        seed, fc = self.config.seed, self.fc
        sampled, bad = sample_round(fc, seed, round_)
        global_params, global_buffers = self.flat.read()
        local_buffers, samples, losses, busy = [], [], {}, 0.0
        for i, (pid, evil) in enumerate(zip(sampled, bad, strict=True)):
            data = self.population.attacker_data(pid) if evil else self.population.data[pid]
            report = self.local.train(data, (global_params, global_buffers),
                                      self.plans[evil], stream(seed, CLIENT_STREAM, round_, pid),
                                      self.updates[i])
            if evil:
                self.updates[i] *= fc.weight_scale  # model replacement boosting
            local_buffers.append(self.flat.read_buffers())
            samples.append(report.samples)
            busy += report.seconds
            for name, value in report.losses.items():
                losses.setdefault(name, []).append(value)
        trained = time.perf_counter()

        ctx = RoundContext(fc.eta, fc.participants, torch.tensor(sampled),
                           torch.tensor(samples), stream(seed, SERVER_STREAM, round_), self.head)
        agg = self.aggregator.aggregate(self.updates, ctx)
        new_buffers = mean_buffers(torch.stack(local_buffers), ctx.samples, agg.accepted,
                                   global_buffers)
        self.flat.write(global_params + agg.delta, new_buffers)
        aggregated = time.perf_counter()

        gen = torch.Generator().manual_seed(seed * 1000 + EVAL_STREAM)
        metrics = evaluate(self.flat.model, self.test_loader, self.comps.synthesizer, gen,
                           self.backdoor_loader)
        end = time.perf_counter()
        flagged = None if agg.flagged is None else agg.flagged.cpu().tolist()
        return {
            "kind": "round", "round": round_, "epoch": round_, "lr": self.config.train.lr,
            "participants": sampled,
            "attackers": [p for p, b in zip(sampled, bad, strict=True) if b],
            "samples": samples,
            "update_norms": self.updates.norm(dim=1).cpu().tolist(),
            "coefficients": None if agg.coefficients is None
            else agg.coefficients.cpu().tolist(),
            "flagged": flagged,
            "detection": detection(flagged, bad)
            if flagged is not None and self.aggregator.flags_clients else None,
            "train_loss": {k: sum(v) / len(v) for k, v in losses.items()},
            **metrics,
            # train_seconds - local_train_seconds: the per-client setup cost.
            "train_seconds": trained - start, "local_train_seconds": busy,
            "aggregate_seconds": aggregated - trained,
            "eval_seconds": end - aggregated, "round_seconds": end - start,
        }


def _checkpoint(run_: Run, model: torch.nn.Module, row: dict[str, Any], best: float,
                save_on: list[int]) -> float:
    run_.save_weights(model, "last")
    if row["round"] in save_on:
        run_.save_weights(model, f"epoch_{row['round']}")
    if row["clean_accuracy"] > best:
        best = row["clean_accuracy"]
        run_.save_weights(model, "best")
    return best


def _write_trigger(run_: Run, comps: Components, config: Config, population: Population
                   ) -> None:
    """The attack artifact: trigger tensors, spec, and the training-set indices poisoned
    by attackers so far (data poisoning only)."""
    trigger = comps.synthesizer.state_tensors()
    if trigger:
        save_file({k: v.detach().contiguous().cpu() for k, v in trigger.items()},
                  str(run_.path / "trigger.safetensors"))
    poisoned = population.poison_indices()
    run_.write_json("attack.json", {
        "synthesizer": comps.synthesizer.spec(), "attack": config.attack.as_dict(),
        "poisoned_samples": len(poisoned), "poison_indices": poisoned,
    })
