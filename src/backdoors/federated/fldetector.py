"""FLDetector (Zhang et al., "FLDetector: Defending Federated Learning Against Model
Poisoning Attacks via Detecting Malicious Clients", KDD 2022, arXiv 2207.09209).

The server predicts each client's update from its previous one with a Hessian-vector
product (ĝ_i = g_i^prev + H (w_t - w_prev)), H approximated by L-BFGS from the last N
changes of the global model and of the global update (the paper's Algorithms 1 and 2).
A client's suspicious score is the mean over the window of its normalised prediction
error; gap statistics decide whether the scores form more than one cluster and, if so,
k-means with two clusters calls the cluster with the larger mean score malicious.

Client sampling (the paper has every client in every round): a client's previous update
is the one from its last participation within the window and the model change is measured
from the global model of that round; a client seen for the first time (or not within the
window) gets no prediction error and is never flagged that round. The per-round errors
are normalised by their mean rather than their sum, so rounds with different numbers of
scored clients are on one scale (the same up to the constant n when all take part).
Updates are negated into gradients (update = local - global, a descent step), which keeps
the L-BFGS curvature positive; the prediction errors do not depend on the sign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext


def lbfgs_hvp(s: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """H v with H the L-BFGS Hessian approximation from pairs s [m, P] (model changes,
    oldest first) and y [m, P] (gradient changes), in the compact form of Byrd, Nocedal
    and Schnabel (1994) used by FLDetector: B = sigma I - [sigma S, Y] M^-1 [sigma S, Y]^T
    with M = [[sigma S^T S, L], [L^T, -D]], L the strictly lower part and D the diagonal of
    S^T Y, sigma = y_m^T s_m / s_m^T s_m."""
    s64, y64, v64 = s.double(), y.double(), v.double()
    sy = s64 @ y64.T
    sigma = float(y64[-1] @ s64[-1]) / max(float(s64[-1] @ s64[-1]), 1e-30)
    lower = torch.tril(sy, diagonal=-1)
    m = torch.cat([torch.cat([sigma * s64 @ s64.T, lower], 1),
                   torch.cat([lower.T, -torch.diag(torch.diag(sy))], 1)], 0)
    rhs = torch.cat([sigma * (s64 @ v64), y64 @ v64])
    p = torch.linalg.pinv(m) @ rhs  # pinv: a degenerate window must not stop the run
    out = sigma * v64 - (sigma * s64.T @ p[: len(s64)] + y64.T @ p[len(s64):])
    return out.to(v.dtype)


def kmeans_1d(x: Tensor, k: int) -> tuple[Tensor, float]:
    """Optimal k-means of 1-D values by dynamic programming over the sorted values (exact
    and deterministic, where Lloyd's algorithm needs restarts): labels numbered from the
    lowest cluster up, and the within-cluster sum of squares."""
    xs, order = x.double().flatten().sort()
    n = len(xs)
    sums = torch.nn.functional.pad(xs.cumsum(0), (1, 0))
    squares = torch.nn.functional.pad(xs.pow(2).cumsum(0), (1, 0))
    i, j = torch.arange(n + 1)[:, None], torch.arange(n + 1)[None, :]
    seg = sums[j] - sums[i]
    cost = (squares[j] - squares[i] - seg.pow(2) / (j - i).clamp(min=1)).clamp(min=0)
    cost = torch.where(j > i, cost, torch.full_like(cost, float("inf")))  # [i, j) non-empty
    best, back = cost[0], []
    for _ in range(k - 1):
        best, arg = (best[:, None] + cost).min(0)
        back.append(arg)
    sorted_labels = torch.zeros(n, dtype=torch.long)
    end = n
    for arg in reversed(back):
        end = int(arg[end])
        sorted_labels[end:] += 1
    labels = torch.empty_like(sorted_labels)
    labels[order] = sorted_labels
    return labels, float(best[n])


def gap_clusters(scores: Tensor, generator: torch.Generator, references: int = 20,
                 k_max: int = 10) -> int:
    """The number of clusters gap statistics (Tibshirani et al., 2001) find in 1-D scores:
    min-max normalised, compared with `references` uniform samples on [0, 1]; the smallest
    k with gap(k) >= gap(k + 1) - s(k + 1). FLDetector's official code uses 20 references
    and k up to 10 (with sklearn's k-means; here the exact 1-D optimum)."""
    x = scores.double().flatten()
    span = float(x.max() - x.min())
    k_max = min(k_max, len(x) - 1, len(x.unique()))
    if k_max < 2 or span == 0:
        return 1
    x = (x - x.min()) / span
    uniform = torch.rand(references, len(x), generator=generator, dtype=torch.float64)
    gaps, sds = [], []
    for k in range(1, k_max + 1):
        ref = torch.tensor([max(kmeans_1d(u, k)[1], 1e-30) for u in uniform]).log()
        gaps.append(float(ref.mean()) - torch.tensor(max(kmeans_1d(x, k)[1], 1e-30)).log().item())
        sds.append(float(ref.std(unbiased=False)) * (1 + 1 / references) ** 0.5)
    for k in range(1, k_max):
        if gaps[k - 1] >= gaps[k] - sds[k]:
            return k
    return k_max


def malicious_cluster(scores: Tensor) -> Tensor:
    """k-means with two clusters on the scores; True for the cluster with the larger mean."""
    return kmeans_1d(scores, 2)[0] == 1


@AGGREGATORS.register("fldetector")
class FLDetector(Aggregator):
    """FLDetector: flag clients whose updates L-BFGS cannot predict (arXiv 2207.09209).

    Zhang et al., KDD 2022. `window` N: the rounds of history for L-BFGS and the scores
    (paper 10); `warmup`: rounds before anyone is flagged (default the window);
    `references` and `k_max`: gap statistics' uniform samples and largest k (official
    code: 20 and 10). Unflagged updates are averaged (FedAvg, sample-weighted). Flags the
    participants in the malicious cluster; a client first seen within the window is never
    flagged (see the module docstring for the client-sampling adaptation)."""

    flags_clients = True
    needs_server = True

    def __init__(self, window: int = 10, warmup: int | None = None, references: int = 20,
                 k_max: int = 10) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if warmup is not None and warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if references < 2 or k_max < 2:
            raise ValueError(f"references and k_max must be >= 2, got {references} and "
                             f"{k_max}")
        self.window, self.references, self.k_max = window, references, k_max
        self.warmup = window if warmup is None else warmup
        self.globals: dict[int, Tensor] = {}  # round -> global parameters of that round
        self.pairs: list[tuple[Tensor, Tensor]] = []  # (delta w, delta g), oldest first
        self.last_grad: tuple[int, Tensor] | None = None  # (round, global gradient)
        self.clients: dict[int, tuple[int, Tensor]] = {}  # pid -> (round, its gradient)
        self.errors: dict[int, list[tuple[int, float]]] = {}  # pid -> (round, error)

    def _predicted_errors(self, grads: Tensor, ids: list[int], w: Tensor) -> dict[int, float]:
        """Each returning client's prediction error ||ĝ_i - g_i||."""
        s = torch.stack([p[0] for p in self.pairs]) if self.pairs else None
        y = torch.stack([p[1] for p in self.pairs]) if self.pairs else None
        hvps: dict[int, Tensor] = {}
        out = {}
        for pid, g in zip(ids, grads, strict=True):
            seen = self.clients.get(pid)
            if seen is None or seen[0] not in self.globals:
                continue
            r, previous = seen
            if r not in hvps:
                change = w - self.globals[r].to(w.device)
                hvps[r] = torch.zeros_like(w) if s is None else lbfgs_hvp(
                    s.to(w.device), y.to(w.device), change)
            out[pid] = float((previous.to(w.device) + hvps[r] - g).norm())
        return out

    def _scores(self, t: int) -> dict[int, float]:
        """Mean normalised error over the window, per client with any."""
        first = t - self.window + 1
        out = {}
        for pid, errs in self.errors.items():
            recent = [e for r, e in errs if r >= first]
            if recent:
                out[pid] = sum(recent) / len(recent)
        return out

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        if ctx.server is None:
            raise ValueError("fldetector needs the server view")
        t, k = ctx.round, len(updates)
        w = ctx.server.global_params.to(updates.device)
        grads = -updates
        ids = ctx.ids.tolist()
        errors = self._predicted_errors(grads, ids, w)
        if errors:
            mean = sum(errors.values()) / len(errors)
            for pid, e in errors.items():
                self.errors.setdefault(pid, []).append((t, e / max(mean, 1e-30)))
        flagged = torch.zeros(k, dtype=torch.bool, device=updates.device)
        scores = self._scores(t)
        if t > self.warmup and len(scores) >= 3:
            values = torch.tensor(list(scores.values()), dtype=torch.float64)
            if gap_clusters(values, ctx.generator, self.references, self.k_max) > 1:
                bad = malicious_cluster(values)
                evil = {pid for pid, b in zip(scores, bad.tolist(), strict=True) if b}
                flagged = torch.tensor([pid in evil for pid in ids], device=updates.device)
        mean_update, coef = rules.accepted_mean(updates, ctx.samples, ~flagged)
        self._remember(t, w, grads, ids, -mean_update)
        return Aggregate(ctx.step(mean_update, k), coef, flagged)

    def _remember(self, t: int, w: Tensor, grads: Tensor, ids: list[int],
                  global_grad: Tensor) -> None:
        """This round's global model, L-BFGS pair and client gradients; drop what fell out
        of the window."""
        if self.last_grad is not None and self.last_grad[0] in self.globals:
            r, g_prev = self.last_grad
            dw, dg = (w - self.globals[r].to(w.device)).cpu(), (global_grad - g_prev.to(
                w.device)).cpu()
            if float(dw.norm()) > 0:
                self.pairs = (self.pairs + [(dw, dg)])[-self.window:]
        self.last_grad = (t, global_grad.detach().cpu().clone())
        self.globals[t] = w.detach().cpu().clone()
        for pid, g in zip(ids, grads, strict=True):
            self.clients[pid] = (t, g.detach().cpu().clone())
        first = t - self.window + 1
        self.globals = {r: g for r, g in self.globals.items() if r >= first}
        self.clients = {p: c for p, c in self.clients.items() if c[0] >= first}
        self.errors = {p: [e for e in es if e[0] >= first] for p, es in self.errors.items()}
        self.errors = {p: es for p, es in self.errors.items() if es}

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {f"global.{r}": g for r, g in self.globals.items()}
        for i, (dw, dg) in enumerate(self.pairs):
            out[f"pair_w.{i}"], out[f"pair_g.{i}"] = dw, dg
        if self.last_grad is not None:
            out[f"last_grad.{self.last_grad[0]}"] = self.last_grad[1]
        for pid, (r, g) in self.clients.items():
            out[f"client.{pid}.{r}"] = g
        for pid, errs in self.errors.items():
            out[f"errors.{pid}"] = torch.tensor(errs, dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.globals, self.clients, self.errors, self.last_grad = {}, {}, {}, None
        dws: dict[int, Tensor] = {}
        dgs: dict[int, Tensor] = {}
        for key, value in state.items():
            kind, *rest = key.split(".")
            if kind == "global":
                self.globals[int(rest[0])] = value
            elif kind == "pair_w":
                dws[int(rest[0])] = value
            elif kind == "pair_g":
                dgs[int(rest[0])] = value
            elif kind == "last_grad":
                self.last_grad = (int(rest[0]), value)
            elif kind == "client":
                self.clients[int(rest[0])] = (int(rest[1]), value)
            elif kind == "errors":
                self.errors[int(rest[0])] = [(int(r), float(e)) for r, e in value.tolist()]
        self.pairs = [(dws[i], dgs[i]) for i in sorted(dws)]
