"""Blind loss poisoning: the backdoor is added by the loss computation itself."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from backdoors.attacks.balancers import BALANCERS, Balancer
from backdoors.attacks.base import ATTACKS, PerSampleAttack, PerSampleStep, StepReport
from backdoors.attacks.loss_terms import (
    LOSS_TERMS,
    LossContext,
    LossTerm,
    RowLossTerm,
    row_factors,
)
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
class BlindAttack(PerSampleAttack):
    """Blind backdoor via loss poisoning (Bagdasaryan & Shmatikov, arXiv 2005.03823).

    Each step copies the batch, triggers the first round(B * fraction) rows of the copy
    (fraction > 1: all; default 1.0), computes every loss term (default `normal` on the
    clean batch and `backdoor` on the copy) and lets the balancer (default MGDA with
    `loss` normalisation) weight them. `loss_threshold`: attack only after 1000 batches
    and once the mean of the last 1000 normal losses is below it. `alternating`: attack on
    that random fraction of batches only. `clip_batch`: truncate batches to N rows.
    Under DP-SGD, sample i and its triggered copy form one privacy unit (see
    `per_sample_step`); only row-wise terms (normal, backdoor) can run there.
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
        for term in self.terms.values():
            term.bind(self.terms, self.balancer)
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

    def carried_state(self) -> str | None:
        if self.loss_threshold is None:
            return None
        return ("attack.loss_threshold (its window of recent losses carries over from one "
                "client's training to the next)")

    def _attacking(self, generator: torch.Generator) -> bool:
        if self.loss_threshold is not None:
            window = self.recent_normal
            if len(window) < THRESHOLD_WINDOW or sum(window) / len(window) >= self.loss_threshold:
                return False
        if self.alternating is not None:
            return float(torch.rand(1, generator=generator)) < self.alternating
        return True

    def _losses(self, model: nn.Module, batch: Batch, generator: torch.Generator
                ) -> tuple[LossContext, dict[str, LossTerm], dict[str, Tensor]]:
        """This step's context, the terms that run and their batch losses."""
        if self.clip_batch is not None:
            batch = batch.select(slice(0, self.clip_batch))
        attack = self._attacking(generator)
        backdoor = self.synthesizer.apply(batch, self.fraction, generator) if attack else batch
        ctx = LossContext(model, batch, backdoor)
        active = {n: t for n, t in self.terms.items() if attack or not t.uses_backdoor}
        losses = {name: term(ctx) for name, term in active.items()}
        self.recent_normal.append(float(losses["normal"].detach()))
        self.steps += 1
        return ctx, active, losses

    def backward(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> StepReport:
        ctx, _, losses = self._losses(model, batch, generator)
        params = [p for p in model.parameters() if p.requires_grad]
        trained = {n: loss for n, loss in losses.items() if self.terms[n].trains_model}
        scales = {**self.balancer.backward(trained, params), **ctx.scales}
        return StepReport({name: float(loss.detach()) for name, loss in losses.items()}, scales)

    def dp_blocker(self) -> str | None:
        rowless = [n for n, t in self.terms.items() if not isinstance(t, RowLossTerm)]
        if not rowless:
            return None
        return (f"loss term(s) {', '.join(rowless)} of the blind attack cannot be split into "
                "per-sample losses; use loss_terms from: normal, backdoor")

    def per_sample_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> PerSampleStep:
        """Unit i = clean row i plus its backdoor copy; its loss is sum_t scale_t * f_ti * l_ti
        (f: `row_factors`). The scales come from the balancer on the whole batch first."""
        ctx, active, losses = self._losses(model, batch, generator)
        params = [p for p in model.parameters() if p.requires_grad]
        scales = self.balancer.weights(losses, params)
        terms = [(name, term) for name, term in active.items() if isinstance(term, RowLossTerm)]
        factors = torch.stack([row_factors(term, ctx) for _, term in terms], 1)  # [N, T]
        has_aux = ctx.clean.aux is not None
        width = 5 if has_aux else 4  # fields per batch (see _fields)

        def unit_losses(forward: Callable[[Tensor], Tensor], *rows: Tensor
                        ) -> dict[str, Tensor]:
            unit = LossContext(forward, _one_row(rows[:width]),  # type: ignore[arg-type]
                               _one_row(rows[width:-1]))
            return {name: rows[-1][i] * term.row_losses(unit)[0]
                    for i, (name, term) in enumerate(terms)}

        return PerSampleStep((*_fields(ctx.clean), *_fields(ctx.backdoor), factors),
                             unit_losses, scales)

    def state_dict(self) -> dict[str, Any]:
        return {"recent_normal": list(self.recent_normal), "steps": self.steps,
                "terms": {name: term.state_dict() for name, term in self.terms.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent_normal = deque(state["recent_normal"], maxlen=THRESHOLD_WINDOW)
        self.steps = int(state["steps"])
        for name, term_state in state.get("terms", {}).items():
            self.terms[name].load_state_dict(term_state)


def _fields(batch: Batch) -> tuple[Tensor, ...]:
    """A batch's row tensors in Batch's field order (aux only when present)."""
    rows = (batch.inputs, batch.labels, batch.indices, batch.poisoned)
    return rows if batch.aux is None else (*rows, batch.aux)


def _one_row(fields: tuple[Tensor, ...]) -> Batch:
    """One unit's fields (row dimension removed under vmap) as a one-row Batch."""
    return Batch(*(f[None] for f in fields))
