"""The Ray client engine (`federated.engine: ray`): a round's clients trained in parallel
by `workers` Ray actors ("Ray: A Distributed Framework for Emerging AI Applications",
Moritz et al., OSDI 2018, arXiv 1712.05889), on this machine or a Ray cluster.

Each actor holds one client side (model, optimizer, participants' data, plans, attacker),
made once from the run's resolved config by the same builder the round loop uses, and
reused every round. A round ships the global weights once (`ray.put`) and the attacker's
`round_state`; each actor trains its share of the sampled clients with `train_client`, the
one place a client trains, and returns (index, update, buffers, samples, losses,
seconds) per client. Updates land in sampling order, so the round is the local engine's
round: every client's randomness comes from its own stream (seed, round, participant).
Bitwise equality also needs equal float arithmetic: the same device and the same torch
intra-op thread count (`int(client_cpus)` in an actor) as the run's own process.

Ray is an optional dependency (`pip install 'backdoors[ray]'`); this module imports it
only when an engine starts, so a config asking for it is refused with one line without
it (`check_ray`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from backdoors.attacks.base import Attack
from backdoors.config import FederatedConfig
from backdoors.errors import BackdoorsError, ConfigError
from backdoors.federated.engine import ClientSide, RoundResult, train_client

MISSING = "federated.engine: ray needs the ray package: pip install 'backdoors[ray]'"
# One client's result: (index in the round, update, float buffers, samples, losses, seconds).
ClientResult = tuple[int, Tensor, Tensor, int, dict[str, float], float]


def import_ray() -> Any:
    """The ray module, or the one-line config error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(MISSING) from None
    return ray


def check_ray(attack: Attack) -> None:
    """Refuse, before anything runs, what the Ray engine cannot run: a missing ray
    package, and an injection attack whose training depends on state earlier clients
    left in it (parallel workers cannot replay that order)."""
    import_ray()
    carried = attack.carried_state()
    if carried is not None:
        raise ConfigError(f"federated.engine: ray cannot run {carried}; use engine: local")


class ClientWorker:
    """The body of one Ray actor: one client side, built once, trains clients round after
    round. Wrapped by `ray.remote` with the config's resources when the engine starts."""

    def __init__(self, build: Callable[[dict[str, Any], str], ClientSide],
                 resolved: dict[str, Any], device: str, threads: int) -> None:
        torch.set_num_threads(threads)  # float sums depend on the split over threads
        self.device = torch.device(device)
        self.clients = build(resolved, device)
        self.update = torch.empty(self.clients.local.flat.size, device=self.device)

    def size(self) -> int:
        return self.clients.local.flat.size

    def train(self, round_: int, jobs: list[tuple[int, int, bool]],
              start: tuple[Tensor, Tensor], round_state: dict[str, Any]
              ) -> list[ClientResult]:
        """Train the (index, participant, compromised) jobs from the global `start`."""
        c = self.clients
        c.attacker.load_round_state(round_state)
        on_device = (start[0].to(self.device), start[1].to(self.device))
        results = []
        for index, pid, evil in jobs:
            out = RoundResult()
            buffers = train_client(c.population, c.local, c.attacker, c.plans, round_, pid,
                                   evil, on_device, self.update, out)
            results.append((index, self.update.cpu().clone(), buffers.cpu(), out.samples[0],
                            {k: v[0] for k, v in out.losses.items()}, out.busy))
        return results


class RayEngine:
    """Clients on `fc.workers` Ray actors of `client_cpus` CPUs and `client_gpus` GPUs each
    (cuda when client_gpus > 0, else cpu). Uses the Ray this process already runs, else
    joins `fc.ray_address`, else starts a local one; `close` ends the actors and only a
    Ray it started."""

    def __init__(self, clients: ClientSide, fc: FederatedConfig, resolved: dict[str, Any],
                 build: Callable[[dict[str, Any], str], ClientSide]) -> None:
        self.ray = ray = import_ray()
        self.clients, self.fc = clients, fc
        self.started = False
        if not ray.is_initialized():
            if fc.ray_address:
                ray.init(address=fc.ray_address, log_to_driver=False)
            else:
                cpus = max(os.cpu_count() or 1, math.ceil(fc.workers * fc.client_cpus))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            self.started = True
        self.actors: list[Any] = []
        try:
            self._check_resources()
            remote = ray.remote(num_cpus=fc.client_cpus, num_gpus=fc.client_gpus)(ClientWorker)
            device = "cuda" if fc.client_gpus > 0 else "cpu"
            threads = max(1, int(fc.client_cpus))
            self.actors = [remote.remote(build, resolved, device, threads)
                           for _ in range(fc.workers)]
            sizes = self._get([a.size.remote() for a in self.actors])
            if any(s != clients.local.flat.size for s in sizes):
                raise ConfigError(f"federated.engine: ray workers built a model of {sizes} "
                                  f"parameters, the run's has {clients.local.flat.size}")
        except BaseException:
            self.close()
            raise

    def _check_resources(self) -> None:
        """Refuse workers the cluster can never place (Ray would wait for them forever)."""
        have = self.ray.cluster_resources()
        for key, each in (("CPU", self.fc.client_cpus), ("GPU", self.fc.client_gpus)):
            need = self.fc.workers * each
            if need > have.get(key, 0.0) + 1e-9:
                raise ConfigError(f"federated.workers x client_{key.lower()}s = {need:g} "
                                  f"{key}s, but the Ray cluster has {have.get(key, 0.0):g}")

    def _get(self, refs: list[Any]) -> list[Any]:
        """ray.get, with a worker's own error (a diverged client) raised as itself."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, BackdoorsError):
                raise exc.cause from None
            raise

    def train_round(self, round_: int, sampled: list[int], bad: list[bool],
                    start: tuple[Tensor, Tensor], updates_out: Tensor) -> RoundResult:
        ray = self.ray
        start_ref = ray.put((start[0].cpu(), start[1].cpu()))
        state_ref = ray.put(self.clients.attacker.round_state())
        jobs = list(enumerate(zip(sampled, bad, strict=True)))
        shares = [[(i, pid, evil) for i, (pid, evil) in jobs[w::len(self.actors)]]
                  for w in range(len(self.actors))]
        done = self._get([actor.train.remote(round_, share, start_ref, state_ref)
                          for actor, share in zip(self.actors, shares, strict=True) if share])
        results = sorted((r for batch in done for r in batch), key=lambda r: r[0])
        out = RoundResult()
        for index, update, buffers, samples, losses, seconds in results:
            updates_out[index].copy_(update)
            out.buffers.append(buffers.to(updates_out.device))
            out.samples.append(samples)
            out.busy += seconds
            for name, value in losses.items():
                out.losses.setdefault(name, []).append(value)
        for pid, evil in zip(sampled, bad, strict=True):
            if evil:  # the driver's record of poisoned rows, re-made from the same stream
                self.clients.population.attacker_data(pid)
        return out

    def close(self) -> None:
        """End the actors, and the Ray this engine started (idempotent)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False
