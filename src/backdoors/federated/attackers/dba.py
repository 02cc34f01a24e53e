"""DBA: the global trigger split over colluding clients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backdoors.attacks.base import Attack
from backdoors.data.loader import Loader
from backdoors.errors import ConfigError
from backdoors.federated.attackers.base import ATTACKERS, AttackerSetup, ModelReplacement
from backdoors.federated.attackers.parts import PartSynthesizer, split_trigger
from backdoors.metrics import evaluate


@ATTACKERS.register("dba")
class DBA(ModelReplacement):
    """Distributed backdoor attack ("DBA: Distributed Backdoor Attacks against Federated
    Learning", Xie et al., ICLR 2020): the config's trigger is split into `parts` local
    triggers (default 4, the paper's CIFAR-10 / Tiny-ImageNet split; parts.py says how
    any synthesizer is split) and compromised participant `pid` poisons its data with
    part pid mod parts, through the config's injection method. The global model is
    scored on the global trigger (the usual `asr`) and on each part (`asr_part_1`...).
    The update is scaled by `federated.weight_scale`, the paper's scale factor gamma
    (100 in its single-shot attacks, 1 in the multiple-shot ones).
    """

    def __init__(self, parts: int = 4) -> None:
        if parts < 2:
            raise ValueError(f"parts must be >= 2, got {parts}")
        self.count = parts
        self.parts: list[PartSynthesizer] = []
        self.attacks: list[Attack] = []

    def bind(self, setup: AttackerSetup) -> None:
        super().bind(setup)
        try:
            self.parts = split_trigger(setup.synthesizer, self.count)
        except ValueError as exc:
            raise ConfigError(f"federated.attacker (dba): {exc}") from None
        self.attacks = [setup.make_attack(part) for part in self.parts]

    def part_of(self, pid: int) -> int:
        """The local trigger of participant `pid` (0-based). Compromised ids are 0..m-1,
        so with the id convention consecutive attackers hold consecutive parts."""
        return pid % self.count

    def injection(self, pid: int) -> Attack:
        return self.attacks[self.part_of(pid)]

    def evaluate(self, model: nn.Module, test_loader: Loader,
                 generator: torch.Generator) -> dict[str, float]:
        return {f"asr_part_{i + 1}": evaluate(model, test_loader, part, generator)["asr"]
                for i, part in enumerate(self.parts)}

    def state_dict(self) -> dict[str, Any]:
        """The part attacks' running state (e.g. a blind attack's loss window), for resume."""
        return {"parts": [attack.state_dict() for attack in self.attacks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for attack, saved in zip(self.attacks, state.get("parts", []), strict=False):
            attack.load_state_dict(saved)
