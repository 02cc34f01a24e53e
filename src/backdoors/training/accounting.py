"""Privacy accounting for DP-SGD: epsilon spent after a number of noisy steps.

Rényi DP of the sampled Gaussian mechanism (Mironov, "Rényi Differential Privacy",
arXiv 1702.07476; Mironov, Talwar & Zhang, arXiv 1908.10530), converted to (epsilon,
delta), through Opacus's RDP accountant (its default orders). The accountant assumes
each sample joins a batch independently with probability q = batch_size / train size
(Poisson sampling); batches here are a shuffled partition of the training set, the
usual approximation (Abadi et al., arXiv 1607.00133, account the same way).
"""

from __future__ import annotations


def sample_rate(batch_size: int, train_size: int) -> float:
    """q = batch_size / train_size, at most 1."""
    return min(1.0, batch_size / max(train_size, 1))


def epsilon(sigma: float, rate: float, steps: int, delta: float = 1e-5) -> float | None:
    """Epsilon of `steps` DP-SGD steps with noise multiplier `sigma` and sample rate
    `rate`, for `delta`. 0 before any step; None when sigma is 0 (no noise, no bound)."""
    if steps <= 0:
        return 0.0
    if sigma <= 0:
        return None
    from opacus.accountants import RDPAccountant  # imported late: opacus loads slowly

    accountant = RDPAccountant()
    accountant.load_state_dict({"history": [(sigma, rate, steps)], "mechanism": "rdp"})
    return float(accountant.get_epsilon(delta))
