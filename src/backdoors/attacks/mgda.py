"""Multiple-gradient descent: the min-norm point in the convex hull of task gradients.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization" (arXiv 1810.04650),
as used by Blind Backdoors (arXiv 2005.03823) to balance the main and backdoor losses.
Pure functions over Gram matrices (G[i, j] = <g_i, g_j>), so they are testable by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Backdoors 101 keeps the two-task weight strictly inside (0, 1) so neither task is dropped.
TWO_TASK_CLIP = (0.001, 0.999)
# Normalisers are capped at this value (Backdoors 101's `loss` and `loss+` modes).
NORMALIZER_CAP = 10.0


def min_norm_two(gram: Tensor) -> Tensor:
    """Closed form for two tasks: w = (gamma, 1 - gamma) minimising |gamma g1 + (1-gamma) g2|.

    gamma = <g2 - g1, g2> / |g1 - g2|^2, clipped to [0.001, 0.999].
    """
    g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
    denom = g11 + g22 - 2 * g12
    if float(denom) <= 1e-20:  # equal gradients: any split is optimal
        gamma = torch.tensor(0.5, dtype=gram.dtype)
    else:
        gamma = (g22 - g12) / denom
    gamma = gamma.clamp(*TWO_TASK_CLIP)
    return torch.stack([gamma, 1 - gamma])


def min_norm_weights(gram: Tensor, iters: int = 250, tol: float = 1e-7) -> Tensor:
    """Weights w on the simplex minimising w^T G w (the min-norm convex combination).

    Two tasks use the closed form; more use Frank-Wolfe with exact line search, started
    from the best pair (Sener & Koltun's Algorithm 2). One task gets weight 1.
    """
    gram = gram.double()
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gram.dtype)
    if k == 2:
        return min_norm_two(gram)
    # Start from the best two-task solution among all pairs.
    best, w = float("inf"), torch.full((k,), 1.0 / k, dtype=gram.dtype)
    for i in range(k):
        for j in range(i + 1, k):
            sub = gram[[i, j]][:, [i, j]]
            pair = min_norm_two(sub)
            cost = float(pair @ sub @ pair)
            if cost < best:
                best = cost
                w = torch.zeros(k, dtype=gram.dtype)
                w[i], w[j] = pair[0], pair[1]
    for _ in range(iters):
        grad = gram @ w
        t = int(grad.argmin())
        # Line search between the current point and vertex t: minimise |(1-a) v + a g_t|^2.
        v_v, v_t, t_t = float(w @ gram @ w), float(grad[t]), float(gram[t, t])
        denom = v_v + t_t - 2 * v_t
        if denom <= 1e-20:
            break
        step = min(max((v_v - v_t) / denom, 0.0), 1.0)
        new = (1 - step) * w
        new[t] += step
        if float((new - w).abs().sum()) < tol:
            w = new
            break
        w = new
    return w


def gradient_normalizers(
    losses: Tensor, grad_norms: Tensor, mode: str
) -> Tensor:
    """Per-task divisors for the gradients, as in Backdoors 101.

    l2: |g|; loss: min(L, 10); loss+: min(L * |g|, 10); none / eq: 1.
    """
    if mode == "l2":
        return grad_norms
    if mode == "loss":
        return losses.clamp(max=NORMALIZER_CAP)
    if mode == "loss+":
        return (losses * grad_norms).clamp(max=NORMALIZER_CAP)
    if mode in ("none", "eq"):
        return torch.ones_like(losses)
    raise ValueError(f"unknown MGDA normalization '{mode}'; expected l2, loss, loss+, none")
