"""The Ray client engine (federated.engine: ray) against the local engine on the tiny
federated task: the same rounds bit for bit at one intra-op thread, workers released on
close, and the one-line errors when ray is missing or a run cannot be parallelised."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from support import fl, rows

from backdoors.assembly.build import build
from backdoors.config import from_dict
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.runs import load_weights

ray = pytest.importorskip("ray")

COMPARED = ("participants", "attackers", "samples", "update_norms", "coefficients",
            "flagged", "train_loss", "clean_accuracy", "asr")


@pytest.fixture(scope="module")
def local_ray(one_thread: Any) -> Any:
    """A local Ray of 2 CPUs for the module (the engine uses it and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _float_state(summary: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The final global model's parameters and float buffers (num_batches_tracked counts
    the driver's own steps: with the Ray engine the driver takes none)."""
    state = load_weights(Path(summary["run_dir"]) / "checkpoints" / "last.safetensors")
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_ray_engine_repeats_the_local_engine_bit_for_bit(tiny, tmp_path, local_ray):
    """Three rounds, a boosted attacker in round 2, FedAvg: two workers on one thread each
    give the local engine's updates, metrics and final weights exactly."""
    cfg = fl(tiny, "fedavg", rounds=3)
    local = run(from_dict(cfg), out=tmp_path, name="local", quiet=True)
    cfg["federated"].update(engine="ray", workers=2)
    ray_run = run(from_dict(cfg), out=tmp_path, name="ray", quiet=True)
    assert ray_run["status"] == "completed" and ray_run["attack_rounds"] == [2]
    ours, theirs = rows(local), rows(ray_run)
    assert [r["round"] for r in theirs] == [1, 2, 3] and theirs[1]["attackers"]
    for a, b in zip(ours, theirs, strict=True):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
    assert ray_run["asr"] == local["asr"] and ray_run["poisoned_samples"] > 0
    assert ray_run["poisoned_samples"] == local["poisoned_samples"]
    a, b = _float_state(local), _float_state(ray_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Not equal by accident: the global model moved from its start every round.
    assert len({r["clean_accuracy"] for r in theirs}) > 1


def _cpus_back(expected: float, within: float = 10.0) -> bool:
    """Whether Ray's free CPUs return to `expected` (killed actors release them)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) == expected:
            return True
        time.sleep(0.2)
    return False


def test_close_ends_the_workers_and_keeps_a_ray_it_did_not_start(tiny, local_ray):
    from backdoors.assembly.data import training_data
    from backdoors.assembly.loops import make_loop

    cfg = fl(tiny, rounds=1)
    cfg["federated"].update(engine="ray", workers=2)
    config = from_dict(cfg)
    comps = build(config)
    loop = make_loop(config, comps, training_data(config, comps, central=False))
    assert ray.available_resources().get("CPU", 0.0) == 0.0  # two workers of one CPU
    loop.run_unit(1)
    loop.close()
    assert _cpus_back(2.0) and ray.is_initialized()


def test_more_workers_than_the_cluster_holds_is_one_config_error(tiny, tmp_path, local_ray):
    cfg = fl(tiny, rounds=1)
    cfg["federated"].update(engine="ray", workers=3)
    with pytest.raises(ConfigError, match=r"workers x client_cpus = 3 CPUs.*has 2"):
        run(from_dict(cfg), out=tmp_path, quiet=True)
    assert _cpus_back(2.0)


def test_missing_ray_is_one_line_at_build_time(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    cfg = fl(tiny)
    cfg["federated"]["engine"] = "ray"
    with pytest.raises(ConfigError) as err:
        build(from_dict(cfg))
    assert str(err.value) == ("federated.engine: ray needs the ray package: "
                              "pip install 'backdoors[ray]'")


def test_an_attack_with_state_across_clients_is_refused_on_ray(tiny):
    cfg = fl(tiny)
    cfg["attack"] = {"name": "blind", "loss_threshold": 1.0}
    cfg["federated"]["engine"] = "ray"
    with pytest.raises(ConfigError, match="cannot run attack.loss_threshold"):
        build(from_dict(cfg))
    cfg["federated"]["engine"] = "local"
    build(from_dict(cfg))
