"""Federated attackers (DBA, constrain-and-scale, PGD, Neurotoxin, Chameleon): their
constraints on hand-made clients, and each one end to end through `backdoors train` on
the tiny synthetic task, with attack timing."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY
from support import StopAfter, fl, rows

from backdoors.attacks import ATTACKS
from backdoors.cli import main as cli_main
from backdoors.config import FederatedConfig, from_dict
from backdoors.data import TASKS
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader
from backdoors.experiment import Interrupted, resume, run
from backdoors.federated import ATTACKERS, Attacker, AttackerSetup
from backdoors.federated.attackers.chameleon import Chameleon
from backdoors.federated.attackers.parts import split_trigger
from backdoors.federated.clients import LocalPlan, LocalTraining
from backdoors.federated.updates import FlatModel
from backdoors.models import MODELS
from backdoors.runs import RunFolder
from backdoors.synthesizers import SYNTHESIZERS
from backdoors.synthesizers.base import Synthesizer

pytestmark = pytest.mark.usefixtures("one_thread")


def bound_synthesizer(name: str, shape: tuple[int, int, int], **kwargs: Any) -> Synthesizer:
    synth = SYNTHESIZERS.build(name, {"target": 1, **kwargs}, "synthesizer")
    synth.bind(shape, 4)
    return synth


@dataclass
class Client:
    """One compromised client on the synthetic task, trained the way the engine does."""

    attacker: Attacker
    local: LocalTraining
    data: ArrayDataset
    plan: LocalPlan
    start: tuple[torch.Tensor, torch.Tensor]

    def train(self, pid: int = 0) -> torch.Tensor:
        update = torch.empty_like(self.start[0])
        plan = LocalPlan(self.attacker.injection(pid), self.plan.epochs, self.plan.lr)
        self.attacker.begin(pid, 1, self.start[0], self.local.flat.model)
        self.attacker.train(self.local, self.data, self.start, plan,
                            torch.Generator().manual_seed(3), update)
        self.attacker.finish(update, pid, 1)
        return update


def client(name: str, weight_scale: float = 1.0, epochs: int = 1, **kwargs: Any) -> Client:
    torch.manual_seed(0)
    task = TASKS.build("synthetic", {"train_size": 128, "test_size": 32}, "task")
    model = MODELS.build("tiny_cnn", {"width": 4}, "model", num_classes=task.num_classes,
                         input_shape=task.input_shape, mean=task.mean, std=task.std)
    synth = bound_synthesizer("pattern", task.input_shape)
    attack = ATTACKS.build("batch", {"fraction": 0.5}, "attack")
    attack.bind(synth, model)

    def make_attack(s: Synthesizer) -> Any:
        a = ATTACKS.build("batch", {"fraction": 0.5}, "attack")
        a.bind(s, model)
        return a

    flat = FlatModel(model)
    fc = FederatedConfig(participants=10, per_round=5, adversaries=2, weight_scale=weight_scale)
    attacker = ATTACKERS.build(name, kwargs, "federated.attacker")
    attacker.bind(AttackerSetup(fc, synth, attack, make_attack, flat.size, flat.head(), 0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    test = Loader(task.test, 32, torch.device("cpu"))
    local = LocalTraining(flat, optimizer, test, 32, torch.device("cpu"), None)
    return Client(attacker, local, task.train, LocalPlan(attack, epochs, 0.05), flat.read())


# ---- PGD and constrain-and-scale: norm bounds ---------------------------------------


@pytest.mark.parametrize("replacement", [False, True])
def test_pgd_update_lies_in_the_eps_ball_after_finish(replacement):
    c = client("pgd", weight_scale=10.0 if replacement else 1.0, eps=0.5, project_every=1,
               replacement=replacement)
    update = c.train()
    assert float(update.norm()) <= 0.5 + 1e-5
    assert float(update.norm()) > 0.4  # the projection was active, not a tiny update
    # during training the ball has radius eps / weight_scale (projected after every step)
    inside = c.local.flat.read()[0] - c.start[0]
    assert float(inside.norm()) <= 0.5 / (10.0 if replacement else 1.0) + 1e-5


def test_pgd_refuses_weight_scale_without_replacement():
    with pytest.raises(Exception, match="replacement"):
        client("pgd", weight_scale=5.0)


@pytest.mark.parametrize(("bound", "scale"), [(0.3, 20.0), (1e6, 3.0)])
def test_constrain_and_scale_sends_at_most_the_bound(bound, scale):
    plain = client("constrain_and_scale", weight_scale=1.0, alpha=1.0).train()
    sent = client("constrain_and_scale", weight_scale=scale, alpha=1.0, bound=bound).train()
    assert float(sent.norm()) <= bound + 1e-5
    # gamma = min(weight_scale, S / ||update||): the bound or the full boost
    expected = min(bound, scale * float(plain.norm()))
    assert float(sent.norm()) == pytest.approx(expected, rel=1e-4)


def test_the_anomaly_term_keeps_the_update_near_the_global_model():
    free = client("constrain_and_scale", alpha=1.0, epochs=2).train()
    near = client("constrain_and_scale", alpha=0.3, epochs=2).train()
    assert float(near.norm()) < 0.8 * float(free.norm())


# ---- Neurotoxin ---------------------------------------------------------------------


def test_neurotoxin_masks_the_top_ratio_of_the_global_change():
    c = client("neurotoxin", ratio=0.1, mask_from="global_change")
    old = c.start[0]
    change = torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    c.attacker.observe(1, old, old + change)
    masked = c.attacker.round_state()["masked"]
    k = int(torch.tensor(0.1 * old.numel()).ceil())
    assert len(masked) == k
    smallest_masked = change.abs()[masked].min()
    others = torch.ones_like(change, dtype=torch.bool)
    others[masked] = False
    assert smallest_masked >= change.abs()[others].max()
    update = c.train()
    assert bool((update[masked] == 0).all())
    assert float((update[others] != 0).float().mean()) > 0.5


def test_neurotoxin_masks_nothing_before_a_global_change_is_observed():
    c = client("neurotoxin", mask_from="global_change")
    assert c.attacker.round_state() == {}
    assert float((c.train() != 0).float().mean()) > 0.5


def test_neurotoxin_masks_the_top_of_its_own_benign_gradient():
    """The default mask: the largest coordinates of the cross-entropy gradient on the
    attacker's own data at the global weights, made on the client (no round state)."""
    c = client("neurotoxin", ratio=0.1)
    update = c.train()
    masked = c.attacker.masked
    assert c.attacker.round_state() == {}
    assert len(masked) == int(torch.tensor(0.1 * update.numel()).ceil())
    assert bool((update[masked] == 0).all())
    others = torch.ones_like(update, dtype=torch.bool)
    others[masked] = False
    assert float((update[others] != 0).float().mean()) > 0.5


def test_neurotoxin_round_state_travels_to_a_fresh_attacker():
    c = client("neurotoxin", ratio=0.2, mask_from="global_change")
    c.attacker.observe(1, c.start[0], c.start[0] + torch.linspace(-1, 1, c.start[0].numel()))
    other = client("neurotoxin", ratio=0.2, mask_from="global_change")
    other.attacker.load_round_state(c.attacker.round_state())
    assert bool((other.train()[c.attacker.round_state()["masked"]] == 0).all())


# ---- DBA ----------------------------------------------------------------------------


def _composed(parts: list[Synthesizer], x: torch.Tensor) -> torch.Tensor:
    for part in parts:
        x = part.synthesize_inputs(x, torch.Generator().manual_seed(0))
    return x


@pytest.mark.parametrize(("name", "shape", "parts"), [("pattern", (1, 16, 16), 4),
                                                      ("pattern", (3, 16, 16), 3),
                                                      ("blend", (3, 16, 16), 4),
                                                      ("blend", (1, 16, 16), 5)])
def test_dba_parts_together_are_exactly_the_global_trigger(name, shape, parts):
    synth = bound_synthesizer(name, shape)
    pieces = split_trigger(synth, parts)
    assert len(pieces) == parts
    masks = torch.stack([p.mask for p in pieces])
    assert int(masks.sum(0).max()) == 1  # disjoint
    x = torch.rand((6, *shape), generator=torch.Generator().manual_seed(2))
    whole = synth.synthesize_inputs(x, torch.Generator().manual_seed(0))
    assert torch.equal(_composed(pieces, x), whole)  # pixel-exact union
    assert torch.equal(whole[:, :, ~masks.any(0)], x[:, :, ~masks.any(0)])
    for piece in pieces:
        part = piece.synthesize_inputs(x, torch.Generator().manual_seed(0))
        assert not torch.equal(part, whole) and not torch.equal(part, x)


def test_dba_gives_participant_pid_part_pid_mod_parts():
    c = client("dba", parts=4)
    parts = [c.attacker.injection(pid).synthesizer for pid in range(6)]
    assert [p.index for p in parts] == [0, 1, 2, 3, 0, 1]  # type: ignore[attr-defined]
    assert parts[0].synthesize_labels is not None and parts[0].target == 1


def test_dba_refuses_a_moving_trigger():
    with pytest.raises(Exception, match="fixed region"):
        split_trigger(bound_synthesizer("pattern", (1, 16, 16), dynamic=True, min_size=3,
                                        max_size=5), 4)


# ---- Chameleon ----------------------------------------------------------------------


def test_chameleon_contrastive_stage_lowers_its_loss():
    c = client("chameleon", contrastive_epochs=4, contrastive_lr=0.05)
    attacker = c.attacker
    assert isinstance(attacker, Chameleon)
    c.local.flat.write(*c.start)
    losses = attacker.contrastive_stage(c.local.flat.model, c.local, c.data,
                                        c.plan.attack.synthesizer, c.plan.lr,
                                        torch.Generator().manual_seed(0))
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2


def test_chameleon_head_stage_changes_only_the_head():
    c = client("chameleon", contrastive_epochs=0)
    head = c.local.flat.head()
    update = c.train()
    outside = torch.cat([update[: head.start], update[head.stop:]])
    assert bool((outside == 0).all()) and float(update[head].abs().sum()) > 0
    both = client("chameleon", contrastive_epochs=1).train()
    assert float(torch.cat([both[: head.start], both[head.stop:]]).abs().sum()) > 0


# ---- end to end through `backdoors train` -------------------------------------------

ATTACKER_RUNS: dict[str, dict[str, Any]] = {
    "dba": {"name": "dba"},
    "constrain_and_scale": {"name": "constrain_and_scale", "bound": 1.5},
    "pgd": {"name": "pgd", "eps": 1.0, "replacement": True},
    "neurotoxin": {"name": "neurotoxin", "ratio": 0.05},
    "chameleon": {"name": "chameleon", "contrastive_epochs": 1},
}


def train_cli(cfg: dict[str, Any], folder: Path, name: str) -> tuple[dict[str, Any], list]:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path), "--out", str(folder), "--name", name, "--quiet"]) == 0
    summary = RunFolder(folder / name).read_summary()
    return summary, rows(summary)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], list]]:
    """Each attacker for 2 rounds: 4 compromised ids, 2 forced into round 2 (the attack
    window), boosted by 5."""
    folder = tmp_path_factory.mktemp("fl_attackers")
    out = {}
    for key, attacker in ATTACKER_RUNS.items():
        cfg = fl(copy.deepcopy(TINY), attack_round=None, adversaries=4,
                 attackers_per_round=2, attack_window=[2, 2], attacker=attacker)
        out[key] = train_cli(cfg, folder, key)
    return out


@pytest.mark.parametrize("key", list(ATTACKER_RUNS))
def test_each_attacker_backdoors_fedavg_end_to_end(runs, key):
    summary, table = runs[key]
    assert summary["status"] == "completed" and summary["attacker"] == key
    assert summary["attack_rounds"] == [2] and len(table[1]["attackers"]) == 2
    assert summary["max_asr"] >= 0.9  # the boosted round-2 update carries the backdoor
    assert table[0]["asr"] <= 0.2


def test_norm_bounded_attackers_respect_their_bound_end_to_end(runs):
    for key, bound in (("pgd", 1.0), ("constrain_and_scale", 1.5)):
        row = runs[key][1][1]
        norms = [n for p, n in zip(row["participants"], row["update_norms"], strict=True)
                 if p in row["attackers"]]
        assert max(norms) <= bound + 1e-5 and min(norms) > 0.5 * bound


def test_dba_rows_score_every_part(runs):
    for row in runs["dba"][1]:
        assert {f"asr_part_{i}" for i in range(1, 5)} <= set(row)
    assert max(runs["dba"][1][1][f"asr_part_{i}"] for i in range(1, 5)) >= 0.5


def test_attack_window_attacks_exactly_its_rounds(tmp_path):
    cfg = fl(copy.deepcopy(TINY), rounds=6, attack_round=None, adversaries=4,
             attackers_per_round=1, attack_window=[3, 4],
             attacker={"name": "neurotoxin"})
    summary, table = train_cli(cfg, tmp_path, "window")
    assert [r["round"] for r in table if r["attackers"]] == [3, 4]
    assert summary["attack_rounds"] == [3, 4] and summary["last_attack_round"] == 4
    assert len(summary["asr_since_attack"]) == 6 - 4
    assert summary["asr_1_rounds_after"] == table[4]["asr"]


@pytest.mark.parametrize("name", ["dba", "neurotoxin"])
def test_stateful_attackers_resume_like_an_uninterrupted_run(tmp_path, name):
    cfg = from_dict(fl(copy.deepcopy(TINY), rounds=3, attack_round=None, adversaries=4,
                       attackers_per_round=2, attack_window=[2, 3],
                       attacker={"name": name}))
    whole = run(cfg, out=tmp_path, name="whole", quiet=True)
    with pytest.raises(Interrupted):
        run(cfg, out=tmp_path, name="cut", hooks=[StopAfter(2)], quiet=True)
    resumed = resume(tmp_path / "cut", quiet=True)
    assert [r["round"] for r in rows(resumed)] == [1, 2, 3]
    for key in ("clean_accuracy", "asr", "max_asr"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6)
    assert rows(resumed)[-1]["update_norms"] == pytest.approx(rows(whole)[-1]["update_norms"])
