"""Federated learning pieces on hand-made inputs: splits, aggregator adapters, flat
weights, config validation and the legacy fl_* keys."""

from __future__ import annotations

import pytest
import torch

from backdoors.assembly.build import build, resolved_config
from backdoors.config import FederatedConfig, from_dict
from backdoors.config.compat import convert_legacy
from backdoors.errors import ConfigError
from backdoors.federated import AGGREGATORS, RoundContext
from backdoors.federated.outputs import detection, totals
from backdoors.federated.partition import dirichlet_split, iid_split
from backdoors.federated.population import sample_round
from backdoors.federated.updates import FlatModel, mean_buffers
from backdoors.models import MODELS


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def labels(n: int = 2000, classes: int = 10) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=gen(5))


# ---- splits -------------------------------------------------------------------------


def _covers_once(parts: list[torch.Tensor], n: int) -> bool:
    allidx = torch.cat(parts)
    return len(allidx) == n and torch.equal(allidx.sort().values, torch.arange(n))


def test_iid_split_covers_every_sample_once_with_equal_sizes():
    parts = iid_split(1003, 10, gen())
    assert _covers_once(parts, 1003)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.05, 0.9, 1000.0])
def test_dirichlet_split_sizes_add_up(alpha):
    y = labels()
    parts = dirichlet_split(y, 20, alpha, gen(1))
    assert len(parts) == 20 and _covers_once(parts, len(y))


def _class_share_error(parts: list[torch.Tensor], y: torch.Tensor) -> float:
    """Mean absolute gap between each participant's class shares and the global ones."""
    glob = torch.bincount(y, minlength=10).float() / len(y)
    gaps = [(torch.bincount(y[p], minlength=10).float() / len(p) - glob).abs().sum()
            for p in parts if len(p)]
    return float(torch.stack(gaps).mean())


def test_dirichlet_alpha_controls_heterogeneity():
    y = labels(5000)
    near_iid = _class_share_error(dirichlet_split(y, 10, 1000.0, gen(2)), y)
    skewed = _class_share_error(dirichlet_split(y, 10, 0.1, gen(2)), y)
    iid = _class_share_error(iid_split(len(y), 10, gen(2)), y)
    assert near_iid < 0.15 and iid < 0.15 and skewed > 0.8


def test_dirichlet_split_is_a_function_of_the_seed():
    y = labels()
    a, b = dirichlet_split(y, 7, 0.5, gen(3)), dirichlet_split(y, 7, 0.5, gen(3))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    c = dirichlet_split(y, 7, 0.5, gen(4))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


# ---- aggregators --------------------------------------------------------------------


def honest(k: int = 10, p: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.ones(p) + 0.1 * torch.randn(k, p, generator=gen(seed))


def ctx(k: int = 10, eta: float = 1.0, n: int = 20, samples: list[int] | None = None,
        ids: list[int] | None = None) -> RoundContext:
    return RoundContext(eta, n, torch.tensor(ids or list(range(k))),
                        torch.tensor(samples or [100] * k), gen(9))


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_aggregator_keeps_benign_rounds_close_to_the_mean(name):
    agg = AGGREGATORS.build(name, {}, "aggregator")
    if agg.needs_server:
        pytest.skip("needs the server view: tests/test_fl_aggregators.py, test_fl_detectors.py")
    agg.check(10)
    u = honest()
    out = agg.aggregate(u, ctx())
    plain = u.mean(0) * 10 / 20  # eta * K / N * mean
    assert out.delta.shape == (30,) and bool(torch.isfinite(out.delta).all())
    assert float((out.delta - plain).norm() / plain.norm()) < 0.2
    if out.coefficients is not None:
        assert out.coefficients.shape == (10,) and float(out.coefficients.sum()) <= 1 + 1e-5
    if out.flagged is not None:
        assert out.flagged.dtype == torch.bool and out.flagged.shape == (10,)
        assert agg.flags_clients


def test_original_is_the_backdoors101_sum():
    u = honest()
    out = AGGREGATORS.build("original", {}, "aggregator").aggregate(u, ctx(eta=2, n=40))
    assert torch.allclose(out.delta, u.sum(0) * 2 / 40)


def test_fedavg_weights_by_samples():
    u = torch.tensor([[0.0], [4.0]])
    out = AGGREGATORS.build("fedavg", {}, "aggregator").aggregate(
        u, ctx(k=2, eta=1, n=2, samples=[300, 100]))
    assert torch.allclose(out.delta, torch.tensor([1.0]))
    assert torch.allclose(out.coefficients, torch.tensor([0.75, 0.25]))


def boosted(k: int = 10, scale: float = 50.0) -> torch.Tensor:
    """Honest updates with client 0 replaced by a boosted update in another direction."""
    u = honest(k)
    u[0] = -scale * torch.ones(u.shape[1]) * torch.linspace(-1, 1, u.shape[1])
    return u


@pytest.mark.parametrize("name, kwargs", [
    ("norm_clipping", {}), ("norm_clipping", {"bound": 2.0}), ("weak_dp", {"noise": 0.0}),
    ("krum", {}), ("multi_krum", {}), ("flame", {"noise_factor": 0.0}),
])
def test_defenses_flag_the_boosted_update_and_bound_its_effect(name, kwargs):
    u = boosted()
    agg = AGGREGATORS.build(name, kwargs, "aggregator")
    out = agg.aggregate(u, ctx(eta=2))
    assert bool(out.flagged[0])
    # The boosted update cannot drag the aggregate away from the honest direction.
    cos = torch.nn.functional.cosine_similarity(out.delta, honest().mean(0), dim=0)
    assert float(cos) > 0.9


def test_krum_flags_all_but_the_chosen_one_multi_krum_only_the_outlier():
    u = boosted()
    krum = AGGREGATORS.build("krum", {}, "aggregator").aggregate(u, ctx())
    assert int((~krum.flagged).sum()) == 1 and float(krum.coefficients.sum()) == 1.0
    multi = AGGREGATORS.build("multi_krum", {"byzantine": 1}, "aggregator").aggregate(u, ctx())
    assert multi.flagged.tolist() == [True] + [False] * 9


def test_norm_clipping_flags_updates_above_the_bound_only():
    u = honest() * 0.1
    u[3] *= 100
    out = AGGREGATORS.build("norm_clipping", {"bound": 1.0}, "aggregator").aggregate(u, ctx())
    assert out.flagged.tolist() == [i == 3 for i in range(10)]
    assert float(out.coefficients[3]) < 0.1 / 10


def test_weak_dp_adds_noise_of_the_given_std():
    u = torch.zeros(10, 20000)
    out = AGGREGATORS.build("weak_dp", {"clip": 1.0, "noise": 0.01}, "aggregator").aggregate(
        u, ctx())
    assert abs(float(out.delta.std()) - 0.01) < 0.001


def test_foolsgold_learns_sybils_from_history():
    agg = AGGREGATORS.build("foolsgold", {}, "aggregator")
    sybil = torch.linspace(-1, 1, 30) * 3
    for r in range(3):
        u = torch.randn(10, 30, generator=gen(r))
        u[0] = sybil + 0.01 * torch.randn(30, generator=gen(100 + r))
        u[1] = sybil + 0.01 * torch.randn(30, generator=gen(200 + r))
        out = agg.aggregate(u, ctx())
    assert out.flagged[:2].tolist() == [True, True]
    assert float(out.coefficients[:2].sum()) == 0 and bool((out.coefficients[2:] > 0.05).all())
    state = agg.state_dict()
    fresh = AGGREGATORS.build("foolsgold", {}, "aggregator")
    fresh.load_state_dict(state)
    assert set(fresh.history) == set(range(10))


def test_server_step_is_eta_k_over_n():
    assert float(ctx(eta=3, n=30).step(torch.tensor([1.0]), 10)) == pytest.approx(1.0)


def test_detection_scores():
    d = detection([True, True, False, False], [True, False, True, False])
    assert (d["true_positives"], d["false_positives"], d["false_negatives"]) == (1, 1, 1)
    assert d["precision"] == 0.5 and d["recall"] == 0.5
    none = detection([False, False], [False, False])
    assert none["precision"] is None and none["recall"] is None
    pooled = totals([{"detection": d}, {"detection": detection([True], [True])},
                     {"detection": None}])
    assert pooled["precision"] == pytest.approx(2 / 3) and pooled["recall"] == pytest.approx(2 / 3)


# ---- flat weights -------------------------------------------------------------------


def tiny_model() -> torch.nn.Module:
    return MODELS.build("tiny_cnn", {"width": 4}, "model", num_classes=4,
                        input_shape=(1, 8, 8), mean=(0.5,), std=(0.5,))


def test_flat_model_round_trip_copies_instead_of_aliasing():
    model = tiny_model()
    flat = FlatModel(model)
    params, buffers = flat.read()
    assert params.numel() == flat.size and buffers.numel() > 0
    flat.write(params + 1, buffers * 2)
    again, buf2 = flat.read()
    assert torch.allclose(again, params + 1) and torch.allclose(buf2, buffers * 2)
    again.zero_()  # a read is a copy
    assert float(flat.read()[0].abs().sum()) > 0
    out = torch.empty(flat.size)
    flat.update_into(params, out)
    assert torch.allclose(out, torch.ones_like(out))
    head = flat.head()
    assert head is not None and head.stop == flat.size


def test_buffers_are_the_sample_weighted_mean_of_accepted_clients():
    b = torch.tensor([[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]])
    out = mean_buffers(b, torch.tensor([100, 300, 100]), torch.tensor([True, True, False]),
                       torch.zeros(2))
    assert torch.allclose(out, torch.tensor([2.5, 2.5]))
    fallback = mean_buffers(b, torch.tensor([0, 0, 0]), None, torch.zeros(2))
    assert torch.equal(fallback, torch.zeros(2))


def test_num_batches_tracked_is_not_aggregated():
    model = tiny_model()
    flat = FlatModel(model)
    assert all(b.is_floating_point() for b in flat.buffers)
    assert any(not b.is_floating_point() for b in model.buffers())


# ---- who attacks ----------------------------------------------------------------------


def test_single_round_attack_uses_the_first_sampled_participants():
    fc = FederatedConfig(participants=20, per_round=5, adversaries=2, attack_round=3)
    sampled, bad = sample_round(fc, 0, 3)
    assert bad == [True, True, False, False, False]
    assert not any(sample_round(fc, 0, 2)[1])


def test_fixed_adversaries_attack_whenever_sampled():
    fc = FederatedConfig(participants=6, per_round=6, adversaries=2)
    sampled, bad = sample_round(fc, 0, 1)
    assert sorted(sampled) == list(range(6))
    assert bad == [p < 2 for p in sampled]


# ---- config -------------------------------------------------------------------------


def native(federated: dict) -> dict:
    return {"task": {"name": "synthetic"}, "federated": federated,
            "synthesizer": {"name": "pattern", "target": 1}}


@pytest.mark.parametrize("section, needle", [
    ({"participant": 10}, "unknown key 'participant' in federated (did you mean "
                          "'participants'?)"),
    ({"per_round": 30, "participants": 20}, "federated.per_round"),
    ({"split": "noniid"}, "bad value for federated.split"),
    ({"aggregator": {"name": "krumm"}}, "unknown aggregator 'krumm' at "
                                        "federated.aggregator.name (did you mean 'krum'?)"),
    ({"aggregator": {"name": "multi_krum", "kepp": 3}}, "unknown key 'kepp' in "
                                                        "federated.aggregator"),
    ({"aggregator": {"name": "krum", "byzantine": 8}}, "federated.aggregator (krum)"),
    ({"attack_round": 2}, "federated.attack_round needs federated.adversaries"),
    ({"eta": 0}, "federated.eta must be > 0"),
    ({"aggregator": 3}, "'federated.aggregator' needs a 'name'"),
])
def test_config_errors_name_the_key(section, needle):
    with pytest.raises(ConfigError) as info:
        build(from_dict(native(section)))  # aggregator options are checked at build
    assert needle in str(info.value)


def test_config_accepts_a_short_aggregator_and_round_trips():
    cfg = from_dict(native({"participants": 20, "per_round": 10, "aggregator": "flame"}))
    assert cfg.federated.aggregator.name == "flame"
    again = from_dict(cfg.as_dict())
    assert again.federated == cfg.federated
    resolved = resolved_config(cfg, build(cfg))["federated"]
    assert resolved["aggregator"] == {"name": "flame", "noise_factor": 0.001}
    assert "federated" not in from_dict({"task": {"name": "synthetic"}}).as_dict()


# ---- legacy -------------------------------------------------------------------------


def test_legacy_fl_keys_map_to_the_native_section():
    flat = {"task": "CifarFed", "lr": 0.1, "epochs": 30, "scheduler": True, "fl": True,
            "fl_no_models": 10, "fl_local_epochs": 3, "fl_total_participants": 100,
            "fl_eta": 10, "fl_sample_dirichlet": True, "fl_dirichlet_alpha": 0.5,
            "fl_diff_privacy": True, "fl_dp_clip": 2.0, "fl_dp_noise": 0.01,
            "fl_number_of_adversaries": 1, "fl_single_epoch_attack": 5, "fl_weight_scale": 10}
    cfg = from_dict(convert_legacy(flat))
    fc = cfg.federated
    assert cfg.task.name == "cifar10" and cfg.train.scheduler == "none"
    assert (fc.rounds, fc.participants, fc.per_round, fc.local_epochs) == (30, 100, 10, 3)
    assert (fc.eta, fc.split, fc.alpha) == (10.0, "dirichlet", 0.5)
    assert (fc.adversaries, fc.attack_round, fc.weight_scale) == (1, 5, 10.0)
    assert fc.aggregator.as_dict() == {"name": "weak_dp", "clip": 2.0, "noise": 0.01}


def test_legacy_fl_defaults_and_fl_false():
    fc = from_dict(convert_legacy({"task": "MNIST", "lr": 0.1, "fl": True})).federated
    assert (fc.participants, fc.per_round, fc.local_epochs, fc.eta) == (80000, 100, 2, 1.0)
    assert fc.aggregator.name == "original" and fc.split == "iid"
    off = from_dict(convert_legacy({"task": "MNIST", "lr": 0.1, "fl": False,
                                    "fl_no_models": 5}))
    assert off.federated is None


@pytest.mark.parametrize("train, needle", [
    ({"scheduler": "cosine"}, "train.scheduler"),
    ({"dp": True}, "train.dp"),
])
def test_train_options_clients_cannot_honour_are_refused(train, needle):
    with pytest.raises(ConfigError) as info:
        from_dict({**native({"participants": 4, "per_round": 2}), "train": train,
                   "synthesizer": {"name": "pattern", "target": 1}, "attack": "none"})
    assert needle in str(info.value)
