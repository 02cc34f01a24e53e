"""MGDA: the two-task closed form, the Frank-Wolfe solver against a reference solver,
gradient normalisers, and the balancers that turn losses into parameter gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from backdoors.attacks.balancers import BALANCERS, FixedBalancer, MGDABalancer
from backdoors.attacks.mgda import gradient_normalizers, min_norm_two, min_norm_weights
from backdoors.errors import ConfigError


def gram(*vectors: list[float]) -> Tensor:
    g = torch.tensor(vectors, dtype=torch.float64)
    return g @ g.T


def objective(w: Tensor, g: Tensor) -> Tensor:
    return torch.einsum("...i,...ij,...j->...", w, g, w)


def random_grams(k: int, count: int, seed: int, full_rank: bool = False) -> Tensor:
    """Gram matrices of k gradients with norms spread over ~e^±3; rank-deficient ones
    (gradient dimension below k) too unless `full_rank`."""
    gen = torch.Generator().manual_seed(seed)
    grams = []
    for _ in range(count):
        dim = k + 2 if full_rank else int(torch.randint(1, k + 3, (1,), generator=gen))
        vecs = torch.randn(k, dim, generator=gen, dtype=torch.float64)
        vecs = vecs * torch.randn(k, 1, generator=gen, dtype=torch.float64).exp()
        grams.append(vecs @ vecs.T)
    return torch.stack(grams)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based)."""
    u, _ = v.sort(dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ks = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = (u - css / ks > 0).sum(-1, keepdim=True)
    return (v - css.gather(-1, rho - 1) / rho).clamp(min=0)


def reference_min_norm(grams: Tensor, iters: int = 3000) -> Tensor:
    """Accelerated projected gradient (FISTA) on w^T G w over the simplex, batched."""
    lipschitz = 2 * torch.linalg.eigvalsh(grams)[..., -1:]
    w = torch.full(grams.shape[:-1], 1.0 / grams.shape[-1], dtype=grams.dtype)
    y, t = w.clone(), 1.0
    for _ in range(iters):
        grad = 2 * (grams @ y[..., None])[..., 0]
        new = project_simplex(y - grad / lipschitz)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = new + (t - 1) / t_next * (new - w)
        w, t = new, t_next
    return w


# --- two tasks: closed form -------------------------------------------------------------


def test_orthogonal_equal_norm_gradients_split_evenly() -> None:
    w = min_norm_two(gram([1.0, 0.0], [0.0, 1.0]))
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_interior_gamma_matches_hand_computation() -> None:
    # |g(1,0) + (1-g)(0,2)|^2 = g^2 + 4(1-g)^2 is minimal at g = 4/5.
    w = min_norm_two(gram([1.0, 0.0], [0.0, 2.0]))
    assert torch.allclose(w, torch.tensor([0.8, 0.2], dtype=torch.float64))


def test_zero_gradient_gets_almost_all_weight_after_clipping() -> None:
    # The min-norm point of {0, g2} is 0 itself (gamma = 1), clipped to 0.999.
    w = min_norm_two(gram([0.0, 0.0], [3.0, -1.0]))
    assert torch.allclose(w, torch.tensor([0.999, 0.001], dtype=torch.float64))


def test_identical_gradients_split_evenly() -> None:
    w = min_norm_two(gram([2.0, 1.0], [2.0, 1.0]))
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize(
    ("g1", "g2", "expected"),
    [
        # g2 = 2 g1 (same direction): the unclipped optimum is gamma = 2 > 1.
        ([1.0, 0.0], [2.0, 0.0], [0.999, 0.001]),
        # g1 = 2 g2: the unclipped optimum is gamma = -1 < 0.
        ([2.0, 0.0], [1.0, 0.0], [0.001, 0.999]),
    ],
)
def test_two_task_weight_is_clipped_to_open_interval(
    g1: list[float], g2: list[float], expected: list[float]
) -> None:
    w = min_norm_two(gram(g1, g2))
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float64))


def test_two_task_weights_are_best_on_a_fine_grid_of_the_clipped_segment() -> None:
    gammas = torch.linspace(0.001, 0.999, 9981, dtype=torch.float64)
    grid = torch.stack([gammas, 1 - gammas], dim=1)
    for g in random_grams(2, 50, seed=1):
        w = min_norm_weights(g)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        best = float(objective(grid, g).min())
        assert float(objective(w, g)) <= best + 1e-9 * float(g.diagonal().max())


def test_swapping_two_tasks_swaps_their_weights() -> None:
    for g in random_grams(2, 30, seed=2):
        swapped = g.flip(0).flip(1)
        assert torch.allclose(min_norm_weights(swapped), min_norm_weights(g).flip(0))


def test_single_task_gets_weight_one() -> None:
    assert min_norm_weights(gram([1.0, 2.0])).tolist() == [1.0]


# --- three or more tasks: Frank-Wolfe ----------------------------------------------------


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_many_task_weights_lie_on_the_simplex_and_reach_the_min_norm(k: int) -> None:
    grams = random_grams(k, 40, seed=k)
    weights = torch.stack([min_norm_weights(g) for g in grams])
    assert bool((weights >= 0).all())
    assert torch.allclose(weights.sum(1), torch.ones(len(grams), dtype=torch.float64), atol=1e-6)
    best = objective(reference_min_norm(grams), grams)
    found = objective(weights, grams)
    scale = grams.diagonal(dim1=1, dim2=2).amax(1)
    assert bool((found >= best - 1e-7 * scale).all()), "reference solver is not optimal"
    # Frank-Wolfe converges sublinearly; 250 iterations land within ~1e-3 of the gradient scale.
    assert bool((found <= best + 2e-3 * scale).all())


def test_three_orthonormal_gradients_get_equal_weights() -> None:
    w = min_norm_weights(torch.eye(3, dtype=torch.float64))
    assert torch.allclose(w, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-4)


def test_a_gradient_inside_the_hull_gets_all_the_weight() -> None:
    # (0, 0.1) is the point of the hull closest to the origin.
    w = min_norm_weights(gram([-1.0, 1.0], [1.0, 1.0], [0.0, 0.1]))
    assert w[2] > 0.99
    assert float(objective(w, gram([-1.0, 1.0], [1.0, 1.0], [0.0, 0.1]))) == pytest.approx(
        0.01, rel=1e-3
    )


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_permuting_tasks_permutes_weights(k: int) -> None:
    gen = torch.Generator().manual_seed(100 + k)
    for g in random_grams(k, 8, seed=200 + k, full_rank=True):
        perm = torch.randperm(k, generator=gen)
        permuted = min_norm_weights(g[perm][:, perm])
        assert torch.allclose(permuted, min_norm_weights(g)[perm], atol=1e-9)


# --- gradient normalisers ----------------------------------------------------------------


LOSSES = torch.tensor([0.5, 4.0, 30.0])
NORMS = torch.tensor([2.0, 3.0, 0.1])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("l2", [2.0, 3.0, 0.1]),
        ("loss", [0.5, 4.0, 10.0]),
        ("loss+", [1.0, 10.0, 3.0]),
        ("none", [1.0, 1.0, 1.0]),
        ("eq", [1.0, 1.0, 1.0]),
    ],
)
def test_gradient_normalizers(mode: str, expected: list[float]) -> None:
    assert torch.allclose(gradient_normalizers(LOSSES, NORMS, mode), torch.tensor(expected))


def test_unknown_normalizer_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown MGDA normalization 'l1'"):
        gradient_normalizers(LOSSES, NORMS, "l1")


# --- balancers ---------------------------------------------------------------------------


def make_problem() -> tuple[nn.Linear, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    return model, x, torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 0.5])


def quadratic_losses(model: nn.Module, x: Tensor, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    out = model(x)
    return {"main": (out - a).pow(2).mean(), "backdoor": 0.5 * (out - b).pow(2).sum()}


def independent_grads(model: nn.Module, x: Tensor, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Flat gradient of each loss, from its own forward pass."""
    params = list(model.parameters())
    grads = {}
    for name in ("main", "backdoor"):
        loss = quadratic_losses(model, x, a, b)[name]
        grads[name] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    return grads


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("normalize", ["l2", "loss", "loss+", "none"])
def test_mgda_balancer_applies_the_closed_form_weights_to_raw_gradients(normalize: str) -> None:
    model, x, a, b = make_problem()
    losses = quadratic_losses(model, x, a, b)
    values = {n: float(v.detach()) for n, v in losses.items()}
    grads = independent_grads(model, x, a, b)

    scales = MGDABalancer(normalize).backward(losses, list(model.parameters()))

    divisor = {
        "l2": lambda n: grads[n].norm(),
        "loss": lambda n: min(values[n], 10.0),
        "loss+": lambda n: min(values[n] * float(grads[n].norm()), 10.0),
        "none": lambda n: 1.0,
    }[normalize]
    g1, g2 = (grads[n].double() / divisor(n) for n in ("main", "backdoor"))
    gamma = float((g2 - g1) @ g2 / (g1 - g2).pow(2).sum())
    assert 0.001 < gamma < 0.999, "the problem should have an interior optimum"
    assert list(scales) == ["main", "backdoor"]
    assert scales["main"] == pytest.approx(gamma, abs=1e-6)
    assert scales["main"] + scales["backdoor"] == pytest.approx(1.0, abs=1e-6)
    expected = scales["main"] * grads["main"] + scales["backdoor"] * grads["backdoor"]
    assert torch.allclose(flat_grad(model), expected, atol=1e-6)


def test_mgda_balancer_with_one_term_uses_its_plain_gradient() -> None:
    model, x, a, b = make_problem()
    expected = independent_grads(model, x, a, b)["main"]
    losses = {"main": quadratic_losses(model, x, a, b)["main"]}
    assert MGDABalancer().backward(losses, list(model.parameters())) == {"main": 1.0}
    assert torch.allclose(flat_grad(model), expected, atol=1e-6)


@pytest.mark.parametrize("balancer", [FixedBalancer(), MGDABalancer()], ids=["fixed", "mgda"])
def test_balancers_accumulate_into_existing_grads_like_backward(balancer: object) -> None:
    model, x, a, b = make_problem()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    scales = balancer.backward(quadratic_losses(model, x, a, b), params)  # type: ignore[attr-defined]
    grads = independent_grads(model, x, a, b)
    expected = 1 + scales["main"] * grads["main"] + scales["backdoor"] * grads["backdoor"]
    assert torch.allclose(flat_grad(model), expected, atol=1e-6)


def test_fixed_balancer_weights_listed_terms_and_gives_unlisted_ones_weight_one() -> None:
    model, x, a, b = make_problem()
    losses = quadratic_losses(model, x, a, b)
    losses["extra"] = model.weight.pow(2).sum()
    grads = independent_grads(model, x, a, b)
    extra = torch.cat([2 * model.weight.detach().flatten(), torch.zeros(2)])

    balancer = FixedBalancer({"main": 0.3, "backdoor": 2.0})
    scales = balancer.backward(losses, list(model.parameters()))

    assert scales == {"main": 0.3, "backdoor": 2.0, "extra": 1.0}
    expected = 0.3 * grads["main"] + 2.0 * grads["backdoor"] + extra
    assert torch.allclose(flat_grad(model), expected, atol=1e-6)


def test_balancer_registry_rejects_unknown_normalization() -> None:
    assert {"fixed", "mgda"} <= set(BALANCERS.names())
    with pytest.raises(ConfigError, match="attack.balancer.normalize"):
        BALANCERS.build("mgda", {"normalize": "l1"}, "attack.balancer")
