"""MM-BD, SPECTRE and SCAn: the maths each adds (maximum margin and its order-statistic
null, QUantum Entropy scores and the robust covariance filter, SCAn's two-identity
likelihood ratio) on hand-made inputs, and their behaviour on small finished attack runs."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from backdoors.assembly.defending import defend
from backdoors.config import from_dict
from backdoors.defenses import DEFENSES
from backdoors.defenses.mm_bd import gamma_pvalue, margin, max_margin, order_pvalue, signed_index
from backdoors.defenses.robust_stats import (
    inv_sqrt,
    que_matrix,
    que_scores,
    robust_selection,
    spectral_excess,
)
from backdoors.defenses.scan import fit_global, identities, split_statistic, split_two
from backdoors.defenses.scores import auroc
from backdoors.defenses.spectre import spectre_class
from backdoors.errors import ConfigError
from backdoors.experiment import run

pytestmark = pytest.mark.usefixtures("one_thread")

# The 8x8 digits (10 classes: MM-BD's gamma null needs several non-target classes) with
# the pattern trigger on 10% of the training set, target 1; and the same model trained
# clean.
DIGITS: dict[str, Any] = {
    "name": "digits", "seed": 0, "task": {"name": "digits"},
    "train": {"epochs": 4, "lr": 0.05, "batch_size": 32, "tensorboard": False,
              "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}
TARGET = 1
# A tenth of the paper's search (30 starts, 300 steps of 0.01), in larger steps. MM-BD's
# p-value is liberal (see test_gamma_null_flags_an_outlying_maximum_only): a clean model's
# largest margin gets p of a few percent, so the test level is 0.01.
MM_BD = {"starts": 10, "steps": 100, "lr": 0.05, "alpha": 0.01}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("g4")
    runs = {}
    for name, attack in (("backdoored", DIGITS["attack"]), ("clean", {"name": "none"})):
        cfg = copy.deepcopy(DIGITS)
        cfg["attack"] = attack
        run(from_dict(cfg), out=out, name=name, quiet=True)
        runs[name] = out / name
    return runs


def _two_populations(n: int = 400, poison: float = 0.1, dim: int = 20, shift: float = 4.0,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features with anisotropic scales, and a `poison` share moved by `shift`
    along a direction of small clean variance; the poison is the last rows."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.5, dim, dtype=torch.float64)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * scales
    bad = torch.zeros(n, dtype=torch.bool)
    bad[n - round(poison * n):] = True
    x[bad, dim - 1] += shift
    return x, bad


# -- MM-BD: maximum margin and its null ----------------------------------------------------


def test_margin_is_the_target_logit_minus_the_largest_other():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert margin(logits, 0).tolist() == [1.0, -5.0]
    assert margin(logits, 1).tolist() == [-2.0, 5.0]


def test_max_margin_reaches_the_box_optimum_of_a_linear_model():
    # Two classes, logits W x + b: the largest margin over [0, 1]^d is
    # sum(relu(w0 - w1)) + b0 - b1, reached at the corner x = (w0 > w1).
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    signs = torch.tensor([1.0, -1.0]).repeat(8)
    with torch.no_grad():  # weight gaps of 0.5 to 2: every pixel reaches its bound
        model[1].weight.copy_(torch.stack([signs * torch.linspace(0.5, 2.0, 16),
                                           torch.zeros(16)]))
        model[1].bias.copy_(torch.tensor([-3.0, 0.0]))
    w, b = model[1].weight.detach(), model[1].bias.detach()
    optimum = float((w[0] - w[1]).clamp(min=0).sum() + b[0] - b[1])
    start = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    found, reached = max_margin(model, 0, start, steps=300, lr=0.05, tolerance=1e-5)
    assert found.min().item() == pytest.approx(optimum, abs=1e-5)
    assert torch.equal(reached.flatten(1) > 0.5, (w[0] > w[1]).expand(5, 16))
    assert float(reached.min()) >= 0.0 and float(reached.max()) <= 1.0
    assert all(p.grad is None for p in model.parameters())  # the model is not trained


def test_order_pvalue_is_one_minus_the_cdf_to_the_power_of_the_class_count():
    assert order_pvalue(math.log(0.9), 10) == pytest.approx(1 - 0.9**10)
    assert order_pvalue(0.0, 10) == 0.0
    # Far in the tail the p-value keeps its digits (1 - F^K would round to 0).
    assert order_pvalue(math.log1p(-1e-18), 10) == pytest.approx(1e-17, rel=1e-6)


def test_gamma_null_flags_an_outlying_maximum_only():
    rng = np.random.default_rng(0)
    null = torch.from_numpy(rng.gamma(4.0, 1.0, size=9))
    top, p, params = gamma_pvalue(torch.cat([null, torch.tensor([40.0], dtype=null.dtype)]))
    assert top == 9 and p < 1e-3 and all(math.isfinite(v) for v in params)
    # Under the null (all K statistics i.i.d. gamma) the p-value is liberal: the gamma is
    # fitted without the largest draw, so the largest looks extreme more often than the
    # level says (about 30% of p < 0.05 for K = 10); still, a typical null p-value is
    # far above an outlier's.
    null_p = [gamma_pvalue(torch.from_numpy(rng.gamma(4.0, 1.0, size=10)))[1]
              for _ in range(30)]
    assert 0.1 < float(np.median(null_p)) and sum(v < 0.05 for v in null_p) <= 15


def test_gamma_null_that_cannot_be_fitted_gives_p_one():
    assert gamma_pvalue(torch.tensor([1.0, 1.0, 1.0, 5.0]))[1] == 1.0


def test_signed_index_keeps_the_direction_of_the_deviation():
    index = signed_index(torch.tensor([1.0, 2.0, 3.0, 4.0, 30.0, -30.0]))
    assert index[4] > 2 and index[5] < -2


# -- SPECTRE: QUantum Entropy scores and robust whitening -----------------------------------


def test_que_matrix_weighs_directions_by_their_excess_variance():
    m = que_matrix(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)), alpha=4.0)
    weights = torch.tensor([math.exp(4.0), 1.0], dtype=torch.float64)
    assert torch.allclose(m, torch.diag(weights / weights.sum()))
    assert float(m.trace()) == pytest.approx(1.0)
    # No direction with excess variance: all weigh alike.
    assert torch.allclose(que_matrix(torch.eye(3, dtype=torch.float64) * 0.5, 4.0),
                          torch.eye(3, dtype=torch.float64) / 3)


def test_que_scores_are_the_quadratic_form_of_the_que_matrix():
    x, _ = _two_populations(dim=4)
    scores = que_scores(x, alpha=4.0)
    centred = x - x.mean(0)
    m = que_matrix(centred.T @ centred / (len(x) - 1), 4.0)
    assert torch.allclose(scores, torch.einsum("ni,ij,nj->n", x, m, x))


def test_que_scores_rank_the_shifted_minority_first_after_whitening():
    x, bad = _two_populations()
    clean_cov = torch.diag(torch.linspace(3.0, 0.5, 20, dtype=torch.float64) ** 2)
    scores = que_scores(x @ inv_sqrt(clean_cov), alpha=4.0)
    assert auroc(scores, bad) > 0.97


def test_covariance_filter_drops_the_planted_points_first():
    x, bad = _two_populations(dim=6, shift=6.0)
    kept = robust_selection(x, eps=0.1, tau=0.1, limit=80)
    assert int((~kept & bad).sum()) >= 0.8 * int(bad.sum())
    assert int((~kept & ~bad).sum()) <= 0.1 * int((~bad).sum())


def test_spectral_excess_prefers_the_split_that_removes_the_poison():
    x, bad = _two_populations()
    assert spectral_excess(x, ~bad, 4.0) > spectral_excess(x, bad | ~bad, 4.0)


@pytest.mark.parametrize("whiten", ["clean", "robust"])
def test_spectre_ranks_a_ten_percent_poison_first(whiten):
    x, bad = _two_populations()
    # Ledoit-Wolf shrinks a small trusted set's covariance towards the identity and hides
    # the poison's low-variance direction: the clean budget must be a few times the dims.
    trusted = _two_populations(n=200, poison=0.0, seed=1)[0] if whiten == "clean" else None
    found = spectre_class(x, eps_count=40, k=None, alpha=4.0, tau=0.1, clean=trusted)
    assert auroc(found.scores, bad) > 0.95
    assert int((found.removed & bad).sum()) >= 0.9 * int(bad.sum())  # removes 1.5 eps


# -- SCAn: global model and the two-identity likelihood ratio --------------------------------


def test_identity_is_the_gaussian_posterior_mean_of_the_class():
    s_mu, s_e = torch.tensor([[4.0]], dtype=torch.float64), torch.tensor([[1.0]],
                                                                          dtype=torch.float64)
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    mu = identities(x, torch.zeros(3, dtype=torch.long), 1, s_mu, s_e)
    assert float(mu) == pytest.approx(4.0 * 6.0 / (3 * 4.0 + 1.0))  # s_mu sum / (n s_mu + s_e)


def test_global_model_recovers_identity_and_variation_covariances():
    g = torch.Generator().manual_seed(0)
    s_mu, s_e = torch.tensor([4.0, 1.0]), torch.tensor([0.25, 0.5])
    centres = torch.randn(200, 2, generator=g) * s_mu.sqrt()
    labels = torch.arange(200).repeat_interleave(50)
    x = (centres[labels] + torch.randn(len(labels), 2, generator=g) * s_e.sqrt()).double()
    glob = fit_global(x, labels, 200, iterations=100)
    assert torch.allclose(glob.s_mu.diagonal().float(), s_mu, rtol=0.25)
    assert torch.allclose(glob.s_e.diagonal().float(), s_e, rtol=0.1)


def test_split_statistic_is_twice_the_mean_log_likelihood_ratio():
    from scipy.stats import multivariate_normal

    x, bad = _two_populations(n=50, poison=0.4, dim=3)
    s_e = torch.eye(3, dtype=torch.float64) * 2.0
    glob = fit_global(x, bad.long(), 2, iterations=5)
    glob.s_e, glob.precision = s_e, torch.linalg.inv(s_e)
    mu = identities(x, torch.zeros(len(x), dtype=torch.long), 1, glob.s_mu, s_e)[0]
    centres = torch.where(bad[:, None], x[bad].mean(0), x[~bad].mean(0))
    one = multivariate_normal(mu.numpy(), s_e.numpy()).logpdf(x.numpy())
    two = np.array([multivariate_normal(c, s_e.numpy()).logpdf(r)
                    for c, r in zip(centres.numpy(), x.numpy(), strict=True)])
    expected = 2 * float(np.mean(two - one))
    assert split_statistic(x, bad, glob) == pytest.approx(expected, rel=1e-9)
    assert split_statistic(x, torch.ones(len(x), dtype=torch.bool), glob) == 0.0


def test_split_two_separates_two_populations():
    x, bad = _two_populations(n=200, poison=0.3, dim=5, shift=6.0)
    member = split_two(x, torch.linalg.inv(torch.diag(torch.linspace(3.0, 0.5, 5,
                                                                       dtype=torch.float64)
                                                        ** 2)),
                       torch.Generator().manual_seed(0), 100)
    agree = float((member == bad).double().mean())
    assert max(agree, 1 - agree) > 0.95


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options", "key"), [
    ("mm_bd", {"starts": 0}, "starts"), ("mm_bd", {"alpha": 1.5}, "alpha"),
    ("spectre", {"epsilon": 0.6}, "epsilon"), ("spectre", {"whiten": "other"}, "whiten"),
    ("scan", {"threshold": -1.0}, "threshold"),
])
def test_bad_options_are_config_errors_naming_the_key(name, options, key):
    with pytest.raises(ConfigError, match=key):
        DEFENSES.build(name, options, "defense")


# -- behaviour on trained models -------------------------------------------------------------


def test_mm_bd_flags_the_planted_class_and_not_a_clean_model(digits):
    backdoored = defend(digits["backdoored"], "mm_bd", MM_BD)
    assert backdoored["flagged_classes"] == [TARGET] and backdoored["backdoored"]
    assert backdoored["p_value"] < 1e-3 and backdoored["target_flagged"]
    margins = backdoored["margins"]
    assert margins[TARGET] > 1.3 * sorted(margins)[-2]
    assert list((digits["backdoored"] / "defenses").glob("mm_bd*/margins.png"))
    clean = defend(digits["clean"], "mm_bd", MM_BD)
    assert not clean["backdoored"] and clean["p_value"] > 0.01
    assert clean["flagged_classes"] == [] and clean["p_value"] > 20 * backdoored["p_value"]


@pytest.mark.parametrize("name", ["spectre", "scan"])
def test_sanitizers_rank_the_planted_poison_first(name, digits):
    result = defend(digits["backdoored"], name, {})
    assert result["auroc"] > 0.95
    assert result["removed_recall"] > 0.9
    if name == "scan":  # the target splits, no other class does
        assert result["flagged_classes"] == [TARGET] and result["removed_precision"] > 0.9
    assert list((digits["backdoored"] / "defenses").glob(f"{name}*/scores.png"))
