"""Blind loss poisoning: the backdoor is added by the loss computation itself."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import nn

from backdoors.attacks.balancers import BALANCERS, Balancer
from backdoors.attacks.base import ATTACKS, Attack, StepReport
from backdoors.attacks.loss_terms import LOSS_TERMS, LossContext, LossTerm
from backdoors.batch import Batch
from backdoors.errors import ConfigError

# Backdoors 101 waits for this many batches of normal loss before `loss_threshold` applies.
THRESHOLD_WINDOW = 1000


def _component(spec: str | dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """`name` or `{name: ..., **kwargs}` -> (name, kwargs)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return spec["name"], {k: v for k, v in spec.items() if k != "name"}
    raise ConfigError(f"{where} must be a name or a mapping with 'name', got {spec!r}")


@ATTACKS.register("blind")
class BlindAttack(Attack):
    """Blind backdoor via loss poisoning (Bagdasaryan & Shmatikov, arXiv 2005.03823).

    Each step copies the batch, triggers the first round(B * fraction) rows of the copy
    (fraction > 1: all; default 1.0), computes every loss term (default `normal` on the
    clean batch and `backdoor` on the copy) and lets the balancer (default MGDA with
    `loss` normalisation) weight them. `loss_threshold`: attack only after 1000 batches
    and once the mean of the last 1000 normal losses is below it. `alternating`: attack on
    that random fraction of batches only. `clip_batch`: truncate batches to N rows.
    """

    def __init__(
        self,
        loss_terms: list[str | dict[str, Any]] | None = None,
        balancer: str | dict[str, Any] = "mgda",
        fraction: float = 1.0,
        loss_threshold: float | None = None,
        alternating: float | None = None,
        clip_batch: int | None = None,
    ) -> None:
        specs = loss_terms if loss_terms is not None else ["normal", "backdoor"]
        self.terms: dict[str, LossTerm] = {}
        for i, spec in enumerate(specs):
            name, kwargs = _component(spec, f"attack.loss_terms[{i}]")
            if name in self.terms:
                raise ConfigError(f"loss term '{name}' is listed twice in attack.loss_terms")
            self.terms[name] = LOSS_TERMS.build(name, kwargs, f"attack.loss_terms[{i}]")
        if "normal" not in self.terms:
            raise ValueError("loss_terms must include 'normal' (the main task)")
        name, kwargs = _component(balancer, "attack.balancer")
        self.balancer: Balancer = BALANCERS.build(name, kwargs, "attack.balancer")
        if fraction < 0:
            raise ValueError(f"fraction must be >= 0, got {fraction}")
        if alternating is not None and not 0.0 <= alternating <= 1.0:
            raise ValueError(f"alternating must be in [0, 1], got {alternating}")
        if clip_batch is not None and clip_batch < 1:
            raise ValueError(f"clip_batch must be >= 1, got {clip_batch}")
        self.fraction, self.loss_threshold = fraction, loss_threshold
        self.alternating, self.clip_batch = alternating, clip_batch
        self.recent_normal: deque[float] = deque(maxlen=THRESHOLD_WINDOW)
        self.steps = 0

    def start(self, model: nn.Module) -> None:
        # After weights load, so evasion terms see the pre-attack model (e.g. pretrained).
        for term in self.terms.values():
            term.setup(model, self.synthesizer)

    def _attacking(self, generator: torch.Generator) -> bool:
        if self.loss_threshold is not None:
            window = self.recent_normal
            if len(window) < THRESHOLD_WINDOW or sum(window) / len(window) >= self.loss_threshold:
                return False
        if self.alternating is not None:
            return float(torch.rand(1, generator=generator)) < self.alternating
        return True

    def backward(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> StepReport:
        if self.clip_batch is not None:
            batch = batch.select(slice(0, self.clip_batch))
        attack = self._attacking(generator)
        backdoor = self.synthesizer.apply(batch, self.fraction, generator) if attack else batch
        ctx = LossContext(model, batch, backdoor)
        active = {n: t for n, t in self.terms.items() if attack or not t.uses_backdoor}
        losses = {name: term(ctx) for name, term in active.items()}
        params = [p for p in model.parameters() if p.requires_grad]
        scales = self.balancer.backward(losses, params)
        values = {name: float(loss.detach()) for name, loss in losses.items()}
        self.recent_normal.append(values["normal"])
        self.steps += 1
        return StepReport(values, scales)

    def state_dict(self) -> dict[str, Any]:
        return {"recent_normal": list(self.recent_normal), "steps": self.steps,
                "terms": {name: term.state_dict() for name, term in self.terms.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent_normal = deque(state["recent_normal"], maxlen=THRESHOLD_WINDOW)
        self.steps = int(state["steps"])
        for name, term_state in state.get("terms", {}).items():
            self.terms[name].load_state_dict(term_state)
