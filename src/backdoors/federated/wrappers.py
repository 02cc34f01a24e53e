"""Composable aggregators: clipping, noise and detection around any inner rule.

A wrapper changes the updates before its `inner` rule sees them (norm clipping, filter) or
the aggregate after it (noise), so `{name: norm_clipping, bound: 2.0, inner: {name:
trimmed_mean, beta: 0.2}}` clips every update to norm 2 and then takes the trimmed mean.
`inner` is a rule's name or mapping, built through AGGREGATORS (errors name its path,
e.g. `federated.aggregator.inner`); null is the plain mean of the updates (FedAvg without
sample weights, the mean Sun et al. clip before).

How each update was treated composes: flagged = flagged by the wrapper OR by the inner
rule; coefficients multiply where both are linear (None once the inner rule is
coordinate-wise); the inner rule's state (FoolsGold's history) is kept under `inner.`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from backdoors.config.sections import parse_component
from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext
from backdoors.federated.aggregators import FedAvg
from backdoors.registry import nested

InnerSpec = str | dict[str, Any] | None

# Options of wrappers that name another aggregator (written out with their defaults in a
# run's config.yaml).
NESTED_KEYS = ("inner", "detector")


def build_inner(spec: InnerSpec | Aggregator, key: str = "inner") -> Aggregator:
    """The rule `spec` names (None: the plain mean), built through AGGREGATORS at the
    config path of option `key` of the wrapper being built."""
    if isinstance(spec, Aggregator):
        return spec
    if spec is None:
        return FedAvg(weighted=False)
    where = nested(key)
    component = parse_component(spec, where)
    return AGGREGATORS.build(component.name, component.kwargs, where)


def _times(coefficients: Tensor | None, scale: Tensor) -> Tensor | None:
    return None if coefficients is None else coefficients * scale


def _either(mine: Tensor, theirs: Tensor | None) -> Tensor:
    return mine if theirs is None else mine | theirs


class Wrapper(Aggregator):
    """A rule around an `inner` rule: it needs the server when the inner rule does, keeps
    the inner rule's state and report, and flags clients when it or the inner rule
    does (`judges`: whether the wrapper itself flags)."""

    judges = False

    def __init__(self, inner: InnerSpec | Aggregator = None) -> None:
        self.inner = build_inner(inner)

    @property
    def parts(self) -> dict[str, Aggregator]:
        """The wrapped rules by option name (state and reports are kept per part)."""
        return {"inner": self.inner}

    @property  # type: ignore[override]
    def flags_clients(self) -> bool:
        return self.judges or any(p.flags_clients for p in self.parts.values())

    @property  # type: ignore[override]
    def needs_server(self) -> bool:
        return any(p.needs_server for p in self.parts.values())

    def check(self, per_round: int) -> None:
        for part in self.parts.values():
            part.check(per_round)

    def report(self, ctx: RoundContext) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in self.parts.values():
            out.update(part.report(ctx))
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{key}.{name}": value for key, part in self.parts.items()
                for name, value in part.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, part in self.parts.items():
            prefix = f"{key}."
            part.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                  if k.startswith(prefix)})


def _bound(updates: Tensor, bound: float | None) -> float:
    """A fixed norm bound, or (None) the median norm of this round's updates."""
    return float(updates.norm(dim=1).median()) if bound is None else bound


@AGGREGATORS.register("norm_clipping")
class NormClipping(Wrapper):
    """Norm clipping: bound each update's L2 norm, then aggregate (arXiv 1911.07963).

    Sun et al., "Can You Really Backdoor Federated Learning?": every update is scaled down
    to L2 norm <= `bound`; `bound` null (default) uses the median norm of the round's
    updates. `inner` aggregates the clipped updates (default null: their plain mean, as
    in the paper). Flags clipped updates and those the inner rule flags."""

    judges = True

    def __init__(self, bound: float | None = None, inner: InnerSpec | Aggregator = None
                 ) -> None:
        if bound is not None and bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        super().__init__(inner)
        self.bound = bound

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        clipped, scale = rules.clip_norms(updates, _bound(updates, self.bound))
        out = self.inner.aggregate(clipped, ctx)
        return Aggregate(out.delta, _times(out.coefficients, scale),
                         _either(scale < 1, out.flagged))


@AGGREGATORS.register("noise")
class Noise(Wrapper):
    """Gaussian noise on the aggregate of an inner rule (Sun et al., arXiv 1911.07963).

    Adds noise of std `std` (default 0.001, weak DP's) to every coordinate of the inner
    rule's change of the global model (default inner null: the plain mean). Judges no
    client itself."""

    def __init__(self, std: float = 0.001, inner: InnerSpec | Aggregator = None) -> None:
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        super().__init__(inner)
        self.std = std

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        out = self.inner.aggregate(updates, ctx)
        noisy = rules.add_gaussian_noise(out.delta, self.std, ctx.generator)
        return Aggregate(noisy, out.coefficients, out.flagged)


@AGGREGATORS.register("weak_dp")
class WeakDP(Noise):
    """Weak DP: clip each update, aggregate, add Gaussian noise (arXiv 1911.07963).

    Sun et al.; Backdoors 101's fl_diff_privacy: `noise` around `norm_clipping`. Each
    update is clipped to `clip` (null: the round's median norm), aggregated by `inner`
    (null: the plain mean), then Gaussian noise of std `noise` (default 0.001) added to
    every coordinate. Flags clipped updates."""

    def __init__(self, clip: float | None = None, noise: float = 0.001,
                 inner: InnerSpec | Aggregator = None) -> None:
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        super().__init__(noise, NormClipping(clip, build_inner(inner)))
        self.clip, self.noise = clip, noise


@AGGREGATORS.register("filter")
class Filter(Wrapper):
    """Detection as a wrapper: drop the updates a `detector` flags, aggregate the rest.

    `detector` is any rule that judges clients (flame, multi_krum, foolsgold, ...): only
    its flags are used, its aggregate is discarded. `inner` (default null: the plain mean)
    aggregates the kept updates with the server step of the whole round (eta scaled by
    K / kept), so dropping updates does not shrink the step. Flags the dropped updates
    and those the inner rule flags; keeps everyone when the detector flags everyone."""

    judges = True

    def __init__(self, detector: str | dict[str, Any] = "flame",
                 inner: InnerSpec | Aggregator = None) -> None:
        self.detector = build_inner(detector, "detector")
        if not self.detector.flags_clients:
            raise ValueError(f"detector '{self.detector.name}' never flags clients; expected "
                             "a rule that does (flame, multi_krum, krum, foolsgold, ...)")
        super().__init__(inner)

    @property
    def parts(self) -> dict[str, Aggregator]:
        return {"detector": self.detector, "inner": self.inner}

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        judged = self.detector.aggregate(updates, ctx).flagged
        dropped = torch.zeros(k, dtype=torch.bool, device=updates.device) \
            if judged is None or bool(judged.all()) else judged.to(updates.device)
        kept = (~dropped).nonzero().flatten()
        on_cpu = kept.cpu()
        sub = dataclasses.replace(ctx, ids=ctx.ids[on_cpu], samples=ctx.samples[on_cpu],
                                  eta=ctx.eta * k / len(kept))
        out = self.inner.aggregate(updates[kept], sub)
        coefficients = None
        if out.coefficients is not None:
            coefficients = torch.zeros(k, dtype=updates.dtype, device=updates.device)
            coefficients[kept] = out.coefficients.to(updates.dtype)
        flagged = dropped.clone()
        if out.flagged is not None:
            flagged[kept] |= out.flagged.to(updates.device)
        return Aggregate(out.delta, coefficients, flagged)
