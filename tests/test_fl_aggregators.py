"""The robust aggregators of docs/federated_robust.md (FLTrust, RLR, Bulyan, centered
clipping, CRFL) on hand-made updates, the composable wrappers, and one short federated
run per rule through `backdoors train`'s path."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support import fl, rows
from torch import nn

from backdoors.assembly.build import build, resolved_config
from backdoors.config import from_dict
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.federated import AGGREGATORS, RoundContext
from backdoors.federated.aggregation import clip_norms, median
from backdoors.federated.bulyan import bulyan, bulyan_select
from backdoors.federated.centered_clipping import centered_clip
from backdoors.federated.crfl import crfl_certify, crfl_params
from backdoors.federated.fltrust import fltrust
from backdoors.federated.rlr import rlr_signs


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def honest(k: int = 10, p: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.ones(p) + 0.1 * torch.randn(k, p, generator=gen(seed))


class FakeServer:
    """The server view an aggregator sees, with a fixed server update."""

    def __init__(self, update: torch.Tensor, params: torch.Tensor | None = None) -> None:
        self.update = update
        self.tc = SimpleNamespace(lr=0.05)
        self.global_params = torch.zeros_like(update) if params is None else params
        self.calls: list[tuple[int, int, float]] = []

    def root_data(self, n: int) -> int:
        return n

    def train(self, data: int, epochs: int, lr: float, round_: int) -> torch.Tensor:
        self.calls.append((data, epochs, lr))
        return self.update.clone()


def ctx(k: int = 10, eta: float = 1.0, n: int = 10, server: Any = None, round_: int = 1,
        last: int = 0) -> RoundContext:
    return RoundContext(eta, n, torch.arange(k), torch.full((k,), 100), gen(9), None, round_,
                        server, last)


# ---- FLTrust ----------------------------------------------------------------------------


def test_fltrust_scores_rescales_and_weights_by_trust():
    g0 = torch.tensor([2.0, 0.0])
    u = torch.tensor([[10.0, 0.0],   # same direction, 5x the norm: trust 1, rescaled to 2
                      [1.0, 1.0],    # 45 degrees: trust 1/sqrt(2)
                      [-3.0, 0.0],   # opposite: trust 0
                      [0.0, 5.0]])   # orthogonal: trust 0
    agg, trust, coef = fltrust(u, g0)
    assert torch.allclose(trust, torch.tensor([1.0, 1 / math.sqrt(2), 0.0, 0.0]))
    rescaled = torch.tensor([[2.0, 0.0], [math.sqrt(2), math.sqrt(2)]])
    expected = (trust[0] * rescaled[0] + trust[1] * rescaled[1]) / trust.sum()
    assert torch.allclose(agg, expected, atol=1e-6)
    assert torch.allclose(coef @ u, agg, atol=1e-6) and float(coef[2:].abs().sum()) == 0
    zero, _, _ = fltrust(-u[:1], g0)  # nobody agrees with the server: no change
    assert float(zero.abs().sum()) == 0


def test_fltrust_aggregator_trains_on_the_root_data_and_flags_distrusted_clients():
    u = honest()
    u[0] = -50 * torch.ones(30)  # boosted, against the server's direction
    server = FakeServer(torch.ones(30))
    agg = AGGREGATORS.build("fltrust", {}, "aggregator")
    out = agg.aggregate(u, ctx(server=server))
    assert server.calls == [(100, 1, 0.05)]  # root_samples, server_epochs, the clients' lr
    assert out.flagged.tolist() == [True] + [False] * 9
    assert float(out.delta.norm()) <= float(torch.ones(30).norm()) + 1e-4  # ||g0|| bound
    assert agg.needs_server and agg.flags_clients


# ---- RLR --------------------------------------------------------------------------------


def test_rlr_flips_exactly_the_low_agreement_coordinates():
    # Coordinate 0: 5 of 5 agree; 1: 4 vs 1 (|sum| 3); 2: 3 vs 2 (|sum| 1).
    u = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, -1.0],
                      [1.0, -1.0, -1.0]])
    assert rlr_signs(u, 3).tolist() == [1.0, 1.0, -1.0]
    assert rlr_signs(u, 4).tolist() == [1.0, -1.0, -1.0]
    agg = AGGREGATORS.build("rlr", {"threshold": 4, "weighted": False}, "aggregator")
    out = agg.aggregate(u, ctx(k=5, n=5))
    assert torch.allclose(out.delta, u.mean(0) * torch.tensor([1.0, -1.0, -1.0]))
    assert out.flagged is None and agg.report(ctx()) == {"rlr_flipped": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="threshold 4 exceeds"):
        agg.check(3)


# ---- Bulyan ---------------------------------------------------------------------------


def test_bulyan_drops_the_planted_outlier_and_trims_each_coordinate():
    u = honest(k=7)
    u[4] = 40.0
    chosen = bulyan_select(u, byzantine=1)
    assert len(chosen) == 5 and 4 not in chosen.tolist()
    agg, _ = bulyan(u, byzantine=1)
    # beta = 5 - 2 = 3 values per coordinate closest to the selected ones' median.
    sel = u[chosen]
    med = median(sel)
    for j in range(u.shape[1]):
        near = sel[:, j][(sel[:, j] - med[j]).abs().argsort()[:3]]
        assert float(agg[j]) == pytest.approx(float(near.mean()), abs=1e-6)
    out = AGGREGATORS.build("bulyan", {}, "aggregator").aggregate(u, ctx(k=7, n=7))
    assert bool(out.flagged[4]) and int(out.flagged.sum()) == 2 and out.coefficients is None


def test_bulyan_needs_4f_plus_3_updates():
    agg = AGGREGATORS.build("bulyan", {"byzantine": 2}, "aggregator")
    agg.check(11)
    with pytest.raises(ValueError, match="4 \\* byzantine \\+ 3 = 11"):
        agg.check(10)


# ---- centered clipping ----------------------------------------------------------------


def test_centered_clipping_fixed_point_and_bounded_outlier():
    v = torch.linspace(-1, 1, 30)
    same, coef, clipped = centered_clip(v.repeat(10, 1), v, tau=1.0)
    assert torch.allclose(same, v) and not bool(clipped.any())
    u = v.repeat(10, 1)
    u[3] += 1e6
    moved, coef, clipped = centered_clip(u, v, tau=1.0, iterations=1)
    assert float((moved - v).norm()) <= 1.0 / 10 + 1e-6
    assert clipped.tolist() == [i == 3 for i in range(10)]
    # The tracked coefficients reproduce v, for several iterations too.
    for iterations in (1, 3):
        out, coef, _ = centered_clip(u, v, 1.0, iterations)
        assert torch.allclose(coef @ u + (1 - coef.sum()) * v, out, atol=1e-3)


def test_centered_clipping_keeps_its_history_across_rounds_and_checkpoints():
    agg = AGGREGATORS.build("centered_clipping", {"tau": 0.5}, "aggregator")
    u = honest()
    first = agg.aggregate(u, ctx())
    fresh = AGGREGATORS.build("centered_clipping", {"tau": 0.5}, "aggregator")
    fresh.load_state_dict(agg.state_dict())
    a, b = agg.aggregate(u, ctx()), fresh.aggregate(u, ctx())
    assert torch.equal(a.delta, b.delta)
    assert float((a.delta - u.mean(0)).norm()) < float((first.delta - u.mean(0)).norm())


# ---- CRFL -----------------------------------------------------------------------------


def test_crfl_clips_the_global_parameters_and_adds_noise_of_sigma():
    big = torch.full((20000,), 1.0, dtype=torch.float64)  # norm 141
    clipped = crfl_params(big, clip=15.0, sigma=0.0)
    assert float(clipped.norm()) == pytest.approx(15.0, rel=1e-5)
    noisy = crfl_params(torch.zeros(20000), clip=15.0, sigma=0.01, generator=gen())
    assert abs(float(noisy.std()) - 0.01) < 0.0005
    start = torch.full((30,), 10.0)  # norm 54.8: the new model is clipped to 15
    server = FakeServer(torch.zeros(30), params=start)
    agg = AGGREGATORS.build("crfl", {"sigma": 0.0}, "aggregator")
    out = agg.aggregate(honest(), ctx(server=server))
    assert float((start + out.delta).norm()) == pytest.approx(15.0, rel=1e-5)


class Linear(nn.Module):
    """Two classes from one weight w: logits (w * x, -w * x)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.w * x[:, 0], -self.w * x[:, 0]], 1)


def test_crfl_certifies_a_confident_model_and_abstains_on_a_coin_flip():
    x = torch.ones(8, 1)
    pred, radius = crfl_certify(Linear, torch.tensor(1.0), 0.01, 50, x, 0.001, gen())
    # Every copy votes class 0: shares bounded to 0.74 / 0.26 at M = 50, radius 0.0025.
    assert pred.tolist() == [0] * 8 and bool((radius > 0.002).all())
    # w = 0 +- noise: the sign, hence the class, is a coin flip for every copy.
    pred, radius = crfl_certify(Linear, torch.tensor(0.0), 0.01, 50, x, 0.001, gen())
    assert pred.tolist() == [-1] * 8 and float(radius.abs().sum()) == 0


# ---- wrappers -------------------------------------------------------------------------


def test_norm_clipping_over_median_is_the_median_of_clipped_updates():
    u = honest()
    u[0] *= 30
    agg = AGGREGATORS.build("norm_clipping", {"bound": 3.0, "inner": "median"}, "aggregator")
    out = agg.aggregate(u, ctx(n=20))
    clipped, _ = clip_norms(u, 3.0)
    assert torch.allclose(out.delta, median(clipped) * 10 / 20)
    assert out.coefficients is None and bool(out.flagged[0]) and agg.flags_clients


def test_wrapped_flags_and_coefficients_compose():
    u = honest()
    u[0] *= 30
    u[5] = -u[5]
    spec = {"bound": 6.0, "inner": {"name": "multi_krum", "byzantine": 1, "keep": 8}}
    out = AGGREGATORS.build("norm_clipping", spec, "aggregator").aggregate(u, ctx())
    clipped, scale = clip_norms(u, 6.0)
    krum = AGGREGATORS.build("multi_krum", {"byzantine": 1, "keep": 8}, "aggregator")
    inner = krum.aggregate(clipped, ctx())
    assert torch.allclose(out.coefficients, inner.coefficients * scale)
    assert out.flagged.tolist() == ((scale < 1) | inner.flagged).tolist()


def test_weak_dp_and_default_norm_clipping_keep_their_numbers():
    u = honest()
    u[2] *= 10
    clipped, scale = clip_norms(u, float(u.norm(dim=1).median()))
    out = AGGREGATORS.build("norm_clipping", {}, "aggregator").aggregate(u, ctx(n=20))
    assert torch.equal(out.delta, clipped.mean(0) * (10 / 20))
    assert torch.allclose(out.coefficients, scale / 10)
    dp = AGGREGATORS.build("weak_dp", {"clip": 1.0, "noise": 0.01}, "aggregator")
    c = ctx(n=20)
    noisy = dp.aggregate(u, c).delta
    clipped1, _ = clip_norms(u, 1.0)
    noise = torch.randn(30, generator=gen(9))
    assert torch.equal(noisy, clipped1.mean(0) * (10 / 20) + 0.01 * noise)


def test_filter_drops_what_the_detector_flags_and_keeps_the_step():
    u = honest()
    u[0] = 50.0
    spec = {"detector": {"name": "multi_krum", "byzantine": 1}, "inner": "median"}
    out = AGGREGATORS.build("filter", spec, "aggregator").aggregate(u, ctx(n=20))
    assert out.flagged.tolist() == [True] + [False] * 9
    assert torch.allclose(out.delta, median(u[1:]) * 10 / 20)


def test_wrapped_state_goes_through_the_checkpoint():
    agg = AGGREGATORS.build("noise", {"std": 0.0, "inner": "foolsgold"}, "aggregator")
    agg.aggregate(honest(), ctx())
    state = agg.state_dict()
    assert set(state) == {f"inner.{i}" for i in range(10)}
    fresh = AGGREGATORS.build("noise", {"inner": "foolsgold"}, "aggregator")
    fresh.load_state_dict(state)
    assert set(fresh.inner.history) == set(range(10))


def native(aggregator: Any) -> dict[str, Any]:
    return {"task": {"name": "synthetic"}, "synthesizer": {"name": "pattern", "target": 1},
            "federated": {"participants": 20, "per_round": 10, "aggregator": aggregator}}


@pytest.mark.parametrize("aggregator, needle", [
    ({"name": "norm_clipping", "inner": "mediam"},
     "unknown aggregator 'mediam' at federated.aggregator.inner.name (did you mean 'median'?)"),
    ({"name": "norm_clipping", "inner": {"name": "trimmed_mean", "bta": 0.2}},
     "unknown key 'bta' in federated.aggregator.inner (aggregator 'trimmed_mean') (did you "
     "mean 'beta'?)"),
    ({"name": "noise", "inner": {"name": "norm_clipping", "inner": {"name": "trimmed_mean",
                                                                    "beta": 0.7}}},
     "federated.aggregator.inner.inner (aggregator 'trimmed_mean'): beta must be in"),
    ({"name": "filter", "detector": "median"}, "detector 'median' never flags clients"),
    ({"name": "bulyan", "byzantine": 2}, "federated.aggregator (bulyan): Bulyan needs"),
    ({"name": "norm_clipping", "inner": {"beta": 1}}, "'federated.aggregator.inner' needs a"),
])
def test_nested_config_errors_are_one_line_and_name_the_path(aggregator, needle):
    with pytest.raises(ConfigError) as info:
        build(from_dict(native(aggregator)))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_resolved_config_writes_out_the_inner_rules_defaults():
    cfg = from_dict(native({"name": "norm_clipping", "inner": {"name": "noise",
                                                               "inner": "trimmed_mean"}}))
    resolved = resolved_config(cfg, build(cfg))["federated"]["aggregator"]
    assert resolved == {"name": "norm_clipping", "bound": None, "inner": {
        "name": "noise", "std": 0.001, "inner": {"name": "trimmed_mean", "beta": 0.1}}}


# ---- end to end -------------------------------------------------------------------------


@pytest.mark.parametrize("aggregator, flags", [
    ({"name": "fltrust", "root_samples": 32}, True),
    ({"name": "rlr", "threshold": 2}, False),
    ({"name": "bulyan", "byzantine": 1}, True),
    ({"name": "centered_clipping", "tau": 1.0}, True),
    ({"name": "crfl", "clip": 100.0, "smoothing_models": 4, "certify_samples": 16}, False),
    ({"name": "norm_clipping", "inner": {"name": "trimmed_mean", "beta": 0.2}}, True),
])
def test_each_rule_runs_a_federated_training(tiny, tmp_path, one_thread, aggregator, flags):
    cfg = fl(tiny, aggregator, per_round=7)
    summary = run(from_dict(cfg), out=tmp_path, quiet=True)
    assert summary["status"] == "completed" and summary["aggregator"] == aggregator["name"]
    last = rows(summary)[-1]
    assert last["attackers"] and (last["detection"] is not None) == flags
    if flags:
        assert len(last["flagged"]) == 7
    if aggregator["name"] == "rlr":
        assert 0 <= last["rlr_flipped"] <= 1
    if aggregator["name"] == "crfl":
        assert 0 <= last["crfl_certified_accuracy"] <= 1 and last["crfl_mean_radius"] >= 0
        assert "crfl_mean_radius" not in rows(summary)[0]  # certified at the last round
