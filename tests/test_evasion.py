"""Evasion loss terms: each sends gradient where it should and the blind attack runs them."""

from __future__ import annotations

import pytest
import torch

from backdoors.assembly.build import build
from backdoors.attacks.loss_terms import LOSS_TERMS, LossContext
from backdoors.config import from_dict
from backdoors.data import Loader


@pytest.fixture
def comps(tiny):
    tiny["attack"] = {"name": "blind"}
    c = build(from_dict(tiny))
    c.attack.start(c.model)
    return c


def _context(comps, n=16):
    batch = next(iter(Loader(comps.task.train, n, torch.device("cpu"))))
    backdoor = comps.synthesizer.apply(batch, 1.0, torch.Generator().manual_seed(0))
    return LossContext(comps.model, batch, backdoor)


def _term(name, comps, **kwargs):
    term = LOSS_TERMS.build(name, kwargs, "test")
    term.setup(comps.model, comps.synthesizer)
    return term


def _model_grad_norm(model):
    return sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None)


def test_neural_cleanse_steps_the_reversed_trigger_and_trains_the_model(comps):
    term = _term("neural_cleanse", comps, mask_lr=0.1)
    mask_before = term.mask_param.detach().clone()
    loss = term(_context(comps))
    assert not torch.equal(term.mask_param.detach(), mask_before)  # the reverse step ran
    comps.model.zero_grad()
    term.mask_param.grad = None
    loss.backward()
    assert _model_grad_norm(comps.model) > 0
    assert term.mask_param.grad is None  # the model term does not move the trigger
    assert all(p.requires_grad for p in comps.model.parameters())


def test_neural_cleanse_reverse_step_pushes_toward_the_target(comps):
    term = _term("neural_cleanse", comps, mask_lr=0.05)
    ctx = _context(comps, 64)
    target = torch.full_like(ctx.clean.labels, comps.synthesizer.target)

    def target_loss():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(
                comps.model(term._stamp(ctx.clean.inputs)), target))

    before = target_loss()
    for _ in range(20):
        term(LossContext(comps.model, ctx.clean, ctx.backdoor))
    assert target_loss() < before


def test_sentinet_evasion_gradient_reaches_the_model(comps):
    loss = _term("sentinet_evasion", comps)(_context(comps))
    assert loss.requires_grad and float(loss.detach()) >= 0
    comps.model.zero_grad()
    loss.backward()
    assert _model_grad_norm(comps.model) > 0


@pytest.mark.parametrize("similarity", ["norm", "cosine"])
def test_spectral_evasion_is_zero_for_the_frozen_model_and_grows_after_change(similarity, comps):
    term = _term("spectral_evasion", comps, similarity=similarity)
    comps.model.eval()  # batch-norm in eval mode: same features as the frozen copy
    assert float(term(_context(comps)).detach()) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for p in comps.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = term(_context(comps))
    assert float(loss.detach()) > 0
    comps.model.zero_grad()
    loss.backward()
    assert _model_grad_norm(comps.model) > 0
    assert all(p.grad is None for p in term.frozen.parameters())


def test_blind_attack_balances_all_evasion_terms(tiny):
    tiny["attack"] = {"name": "blind", "loss_terms": ["normal", "backdoor", "neural_cleanse",
                                                      "sentinet_evasion", "spectral_evasion"]}
    c = build(from_dict(tiny))
    c.attack.start(c.model)
    batch = next(iter(Loader(c.task.train, 32, torch.device("cpu"))))
    report = c.attack.backward(c.model, batch, torch.Generator().manual_seed(0))
    assert set(report.scales) == {"normal", "backdoor", "neural_cleanse", "sentinet_evasion",
                                  "spectral_evasion"}
    assert sum(report.scales.values()) == pytest.approx(1.0)
    state = c.attack.state_dict()
    assert set(state["terms"]["neural_cleanse"]) == {"mask", "pattern", "optimizer"}


def test_neural_cleanse_balances_the_mask_penalty_like_backdoors_101(comps):
    # Default: MGDA weighs the reverse loss against |mask|_1 (the mask shrinks fast); a
    # fixed weight of NC's initial 1e-3 barely restrains it.
    ctx = _context(comps, 32)
    sizes = {}
    for weight in (None, 1e-3):
        term = _term("neural_cleanse", comps, mask_lr=0.1, mask_weight=weight)
        for _ in range(10):
            term(LossContext(comps.model, ctx.clean, ctx.backdoor))
        sizes[weight] = float(term.trigger()[0].detach().sum())
    assert sizes[None] < 0.5 * sizes[1e-3]
