"""The inner loop of a run: epochs of centralized training or rounds of federated
learning, built from the components and the run's data."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from backdoors.assembly.build import Components
from backdoors.assembly.data import TrainingData, evaluation_loaders, on_device
from backdoors.attacks import ATTACKS, Attack
from backdoors.config import Config
from backdoors.data.dataset import ArrayDataset
from backdoors.errors import ConfigError
from backdoors.federated.loop import RoundLoop
from backdoors.hooks import Hook
from backdoors.synthesizers.base import Synthesizer
from backdoors.training.loop import EpochLoop


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
    """Epochs of centralized training, or federated rounds when the config has them."""
    tc, device = config.train, comps.device
    model = comps.model.to(device)
    test, backdoor = evaluation_loaders(comps, tc.test_batch_size)
    if config.federated is None or comps.aggregator is None:
        return EpochLoop(model, comps.attack, comps.synthesizer, on_device(data.train, device),
                         test, backdoor, tc, config.seed, comps.task.augment,
                         comps.task.num_workers, device)
    if not isinstance(data.clean_train, ArrayDataset):
        raise ConfigError(f"federated training needs an in-memory task; '{config.task.name}' "
                          "streams its images")
    honest = ATTACKS.build("none", {}, "attack")
    honest.bind(comps.synthesizer, model)
    assert comps.attacker is not None  # built with the aggregator

    def make_attack(synthesizer: Synthesizer) -> Attack:
        """The config's injection method bound to another trigger (a DBA part)."""
        attack = ATTACKS.build(config.attack.name, config.attack.kwargs, "attack")
        attack.bind(synthesizer, model)
        return attack

    return RoundLoop(model, comps.attack, honest, comps.synthesizer, data.clean_train, test,
                     backdoor, config.federated, tc, comps.aggregator, config.seed,
                     comps.task.augment, device, comps.attacker, make_attack)
