"""DP-SGD: per-sample clipping against a one-sample-at-a-time reference, noise scale,
privacy accounting against Opacus, every injection method under DP, refusals, legacy keys,
and a tiny end-to-end run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.assembly.build import build
from backdoors.attacks.loss_terms import BackdoorLoss, LossContext, row_factors
from backdoors.batch import Batch
from backdoors.config import from_dict
from backdoors.config.compat import convert_legacy
from backdoors.data.loader import Loader
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.training.accounting import epsilon, sample_rate
from backdoors.training.dp import DPSGD, clip_and_sum, gaussian_noise

CPU = torch.device("cpu")


def dp_config(tiny: dict, attack: dict, **train: object) -> dict:
    tiny = copy.deepcopy(tiny)
    tiny["model"] = {"name": "simple_net", "hidden": 32}  # no batch norm, small and fast
    tiny["attack"] = attack
    tiny["train"].update({"dp": True, **train})
    return tiny


def first_batch(comps, n: int = 12) -> Batch:
    return next(iter(Loader(comps.task.train, n, CPU)))


def grads(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_clipping_matches_one_sample_at_a_time(tiny):
    clip = 0.05  # small enough that every sample's gradient is clipped
    comps = build(from_dict(dp_config(tiny, {"name": "none"}, dp_clip=clip, dp_sigma=0.0)))
    model, batch = comps.model, first_batch(comps)
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(batch)):
        loss = F.cross_entropy(reference(batch.inputs[i : i + 1]), batch.labels[i : i + 1])
        g = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * gi for t, gi in zip(total, g, strict=True)]
    assert min(norms) > clip
    comps.attack.backward(model, batch, torch.Generator().manual_seed(0))
    for p, t in zip(model.parameters(), total, strict=True):
        torch.testing.assert_close(p.grad, t / len(batch), atol=1e-7, rtol=1e-4)


def test_clip_and_sum_on_hand_sized_gradients():
    g = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.5]]), "b": torch.tensor([[4.0], [0.0]])}
    summed, norms = clip_and_sum(g, clip=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(summed["w"], torch.tensor([0.6, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(summed["b"], torch.tensor([0.8]), atol=1e-6, rtol=0)


def test_noise_has_std_sigma_times_clip():
    gen = torch.Generator().manual_seed(0)
    noise = gaussian_noise({"a": torch.zeros(200_000)}, std=0.75, generator=gen)["a"]
    assert abs(float(noise.std()) - 0.75) < 0.01 and abs(float(noise.mean())) < 0.01


def test_dp_step_adds_noise_of_the_configured_scale(tiny):
    sigma, clip, n = 2.0, 0.5, 12
    quiet = build(from_dict(dp_config(tiny, {"name": "none"}, dp_clip=clip, dp_sigma=0.0)))
    noisy = build(from_dict(dp_config(tiny, {"name": "none"}, dp_clip=clip, dp_sigma=sigma)))
    batch = first_batch(quiet, n)
    quiet.attack.backward(quiet.model, batch, torch.Generator().manual_seed(0))
    noisy.attack.backward(noisy.model, batch, torch.Generator().manual_seed(0))
    diff = torch.cat([(a - b).flatten() for a, b in
                      zip(grads(noisy.model).values(), grads(quiet.model).values(), strict=True)])
    assert diff.numel() > 10_000
    assert abs(float(diff.std()) * n / (sigma * clip) - 1) < 0.05  # noise / batch size


ATTACKS = {
    "none": {"name": "none"},
    "data": {"name": "data", "ratio": 0.2},
    "batch": {"name": "batch", "fraction": 0.5},
    "blind_mgda": {"name": "blind"},
    "blind_fixed": {"name": "blind", "balancer": {"name": "fixed", "scales": {"backdoor": 0.3}}},
    "blind_partial": {"name": "blind", "fraction": 0.5, "balancer": {"name": "mgda",
                                                                      "normalize": "l2"}},
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_unclipped_noiseless_dp_equals_the_attacks_own_step(case, tiny):
    """With clip far above any gradient and no noise, the mean of per-sample gradients must
    be the batch gradient the attack computes itself (MGDA scales held fixed per step)."""
    comps = build(from_dict(dp_config(tiny, ATTACKS[case], dp_clip=1e9, dp_sigma=0.0)))
    dp = comps.attack
    assert isinstance(dp, DPSGD)
    train, _ = comps.attack.poison_training_set(comps.task.train, torch.Generator())
    batch = next(iter(Loader(train, 12, CPU)))
    reference, inner = copy.deepcopy(comps.model), copy.deepcopy(dp.attack)
    expected = inner.backward(reference, batch, torch.Generator().manual_seed(3))
    report = dp.backward(comps.model, batch, torch.Generator().manual_seed(3))
    assert report.scales == pytest.approx(expected.scales)
    assert report.losses == pytest.approx(expected.losses, rel=1e-5)
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(comps.model)[name], g, atol=1e-6, rtol=1e-4)


class _Weighted:
    """A synthesizer stand-in whose backdoor loss weights rows (as `complex` does)."""

    def loss_weights(self, batch: Batch) -> Tensor:
        return torch.linspace(0.0, 2.0, len(batch))


def test_weighted_backdoor_loss_splits_into_rows(tiny):
    comps = build(from_dict(dp_config(tiny, {"name": "none"})))
    batch = first_batch(comps)
    term = BackdoorLoss()
    term.synthesizer = _Weighted()  # type: ignore[assignment]
    ctx = LossContext(comps.model, batch, batch)
    w = _Weighted().loss_weights(batch)
    ce = F.cross_entropy(comps.model(batch.inputs), batch.labels, reduction="none")
    torch.testing.assert_close(term(ctx), (ce * w).sum() / w.sum())
    torch.testing.assert_close((term.row_losses(ctx) * row_factors(term, ctx)).mean(),
                               term(ctx))


def test_batch_norm_model_is_refused(tiny):
    cfg = dp_config(tiny, {"name": "none"})
    cfg["model"] = {"name": "tiny_cnn"}
    with pytest.raises(ConfigError, match="train.dp: model 'tiny_cnn' has batch norm"):
        build(from_dict(cfg))


def test_evasion_term_is_refused(tiny):
    cfg = dp_config(tiny, {"name": "blind", "loss_terms": ["normal", "backdoor",
                                                            "neural_cleanse"]})
    with pytest.raises(ConfigError, match="neural_cleanse .*per-sample"):
        build(from_dict(cfg))


@pytest.mark.parametrize("key, value, needle", [
    ("dp_clip", 0.0, "train.dp_clip must be > 0"),
    ("dp_sigma", -1.0, "train.dp_sigma must be >= 0"),
    ("dp_delta", 1.5, "train.dp_delta must be in"),
    ("dp", "yes", "bad value for train.dp"),
])
def test_bad_dp_options_name_the_key(tiny, key, value, needle):
    tiny["train"][key] = value
    with pytest.raises(ConfigError, match=needle):
        from_dict(tiny)


def test_epsilon_grows_with_steps_shrinks_with_sigma_and_matches_opacus():
    from opacus.accountants import RDPAccountant

    q = sample_rate(64, 8000)
    per_epoch = [epsilon(1.0, q, 125 * e) for e in range(1, 6)]
    assert all(a < b for a, b in zip(per_epoch, per_epoch[1:], strict=False))
    by_sigma = [epsilon(s, q, 1250) for s in (0.7, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:], strict=False))
    accountant = RDPAccountant()
    for _ in range(250):
        accountant.step(noise_multiplier=1.1, sample_rate=q)
    assert epsilon(1.1, q, 250, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    assert epsilon(1.0, q, 0) == 0.0 and epsilon(0.0, q, 10) is None
    assert sample_rate(512, 100) == 1.0


def test_legacy_dp_keys_map_to_train_options():
    native = convert_legacy({"task": "MNIST", "lr": 0.1, "loss_tasks": ["normal"],
                             "dp": True, "dp_clip": 2.0, "dp_sigma": 0.5})
    cfg = from_dict(native)
    assert (cfg.train.dp, cfg.train.dp_clip, cfg.train.dp_sigma) == (True, 2.0, 0.5)


def test_noise_stream_resumes_where_it_stopped(tiny):
    cfg = from_dict(dp_config(tiny, {"name": "none"}, dp_sigma=1.0))
    straight, split = build(cfg), build(cfg)
    batch = first_batch(straight)
    for _ in range(2):  # weights never change here: only the noise differs between steps
        straight.model.zero_grad(set_to_none=True)
        straight.attack.backward(straight.model, batch, torch.Generator())
    split.attack.backward(split.model, batch, torch.Generator())
    resumed = build(cfg)
    resumed.attack.load_state_dict(split.attack.state_dict())
    resumed.attack.backward(resumed.model, batch, torch.Generator())
    assert resumed.attack.steps == straight.attack.steps == 2
    for name, g in grads(straight.model).items():
        torch.testing.assert_close(grads(resumed.model)[name], g)


def test_dp_training_learns_and_reports_epsilon(tiny, tmp_path):
    cfg = dp_config(tiny, {"name": "none"}, epochs=2, lr=0.1, batch_size=64)
    summary = run(from_dict(cfg), out=tmp_path, name="dp", quiet=True)
    assert summary["clean_accuracy"] > 0.9
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").open()]
    eps = [r["dp_epsilon"] for r in rows if r["kind"] == "epoch"]
    q = sample_rate(64, len(build(from_dict(cfg)).task.train))
    assert eps == pytest.approx([epsilon(1.0, q, 16 * e) for e in (1, 2)])
    assert summary["dp_epsilon"] == eps[-1] and math.isfinite(eps[-1])
    assert summary["dp_delta"] == 1e-5
