"""The inner loop of a run: epochs of centralized training or rounds of federated
learning, built from the components and the run's data."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor

from backdoors.assembly.build import Components, build, resolved_config
from backdoors.assembly.data import TrainingData, evaluation_loaders, on_device, training_data
from backdoors.attacks import ATTACKS, Attack
from backdoors.config import Config, from_dict
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.errors import ConfigError
from backdoors.execution import accelerated
from backdoors.federated.attackers import AttackerSetup
from backdoors.federated.clients import LocalPlan, LocalTraining
from backdoors.federated.engine import ClientEngine, ClientSide
from backdoors.federated.loop import RoundLoop
from backdoors.federated.population import Population, split
from backdoors.federated.ray_engine import RayEngine
from backdoors.federated.updates import FlatModel
from backdoors.hooks import Hook
from backdoors.synthesizers.base import Synthesizer
from backdoors.training.loop import EpochLoop
from backdoors.training.optim import make_optimizer


class InnerLoop(Protocol):
    """What the lifecycle needs of an inner loop (training/loop.py, federated/loop.py).
    A unit is an epoch or a round, numbered first..last."""

    unit: str
    first: int
    last: int
    steps_per_unit: int  # training steps of a unit that report losses (0: none)
    scalar_group: str  # TensorBoard group of `scalars`

    def start(self) -> None: ...
    def run_unit(self, index: int, on_step: Any) -> dict[str, Any]: ...
    def global_step(self, index: int) -> int: ...
    def console(self) -> Hook: ...
    def scalars(self, row: dict[str, Any]) -> dict[str, float]: ...
    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def poison_rows(self) -> Tensor | None: ...
    def close(self) -> None: ...


def make_loop(config: Config, comps: Components, data: TrainingData) -> InnerLoop:
    """Epochs of centralized training, or federated rounds when the config has them; their
    clients train in this process (`federated.engine: local`) or on Ray workers (`ray`)."""
    tc, device = config.train, comps.device
    model = comps.model.to(device)
    test, backdoor = evaluation_loaders(comps, tc.test_batch_size)
    fc = config.federated
    if fc is None or comps.aggregator is None:
        return EpochLoop(model, comps.attack, comps.synthesizer, on_device(data.train, device),
                         test, backdoor, tc, config.seed, comps.task.augmentation(),
                         comps.task.num_workers, device)
    engine = ray_engine(config, comps) if fc.engine == "ray" else None
    return RoundLoop(client_side(config, comps, data, test), comps.attack, comps.synthesizer,
                     test, backdoor, fc, tc, comps.aggregator, config.seed,
                     comps.task.augmentation(),
                     device, engine)


def ray_engine(config: Config, comps: Components) -> Callable[[RoundLoop], ClientEngine]:
    """The round loop's clients on Ray workers, each re-made from the resolved config
    (absolute paths: a worker may run on another machine of the cluster)."""
    assert config.federated is not None
    fc, resolved = config.federated, resolved_config(config, comps)
    return lambda loop: RayEngine(loop.clients, fc, resolved, worker_clients)


def client_side(config: Config, comps: Components, data: TrainingData, test: Loader
                ) -> ClientSide:
    """What trains federated clients in one process, made in this one place for the round
    loop and for every Ray worker: the participants' shares of the clean training set, the
    honest (`none` attack) and compromised plans, the attacker bound to the run, and one
    model and optimizer they all train on in turn."""
    fc, tc, device = config.federated, config.train, comps.device
    assert fc is not None and comps.attacker is not None  # built with the aggregator
    if not isinstance(data.clean_train, ArrayDataset):
        raise ConfigError(f"federated training needs an in-memory task; '{config.task.name}' "
                          "streams its images")
    model = comps.model.to(device)
    honest = ATTACKS.build("none", {}, "attack")
    honest.bind(comps.synthesizer, model)

    def make_attack(synthesizer: Synthesizer) -> Attack:
        """The config's injection method bound to another trigger (a DBA part)."""
        attack = ATTACKS.build(config.attack.name, config.attack.kwargs, "attack")
        attack.bind(synthesizer, model)
        return attack

    flat = FlatModel(model)
    attacker = comps.attacker
    attacker.bind(AttackerSetup(fc, comps.synthesizer, comps.attack, make_attack, flat.size,
                                flat.head(), config.seed))
    population = Population(data.clean_train, split(data.clean_train, fc, config.seed),
                            attacker.injection, config.seed, device)
    local = LocalTraining(flat, make_optimizer(model, tc), test, tc.batch_size, device,
                          comps.task.augmentation(), tc.max_batches,
                          accelerated(model, tc, device))
    plans = (LocalPlan(honest, fc.local_epochs, tc.lr),
             LocalPlan(comps.attack, fc.attacker_local_epochs or fc.local_epochs,
                       fc.attacker_lr or tc.lr))
    return ClientSide(population, local, plans, attacker)


def worker_clients(resolved: dict[str, Any], device: str) -> ClientSide:
    """A Ray worker's client side on `device`, re-made from the run's resolved config the
    way the run made its own: components, trigger and participants' data all come from
    seeded streams, so every worker holds the same ones as the driver."""
    data = copy.deepcopy(resolved)
    data["train"]["device"] = device
    config = from_dict(data)
    comps = build(config, fresh=False)  # start weights come from the driver every round
    test, _ = evaluation_loaders(comps, config.train.test_batch_size)
    return client_side(config, comps, training_data(config, comps, central=False), test)
