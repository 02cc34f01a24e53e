"""Sweeps: grid files, resumable content-addressed cells, engines with identical numbers,
failures that stay in their cell, and reports over the result."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from backdoors.cli import main
from backdoors.report import report
from backdoors.report.stats import estimate
from backdoors.sweeps import sweep

BASE: dict[str, Any] = {
    "name": "tiny", "task": {"name": "synthetic", "train_size": 192, "test_size": 96},
    "train": {"epochs": 2, "lr": 0.05, "batch_size": 32, "tensorboard": False,
              "progress": False},
    "synthesizer": {"name": "pattern", "target": 1}, "attack": {"name": "data"},
}
GRID: dict[str, Any] = {
    "name": "tiny", "base": "base.yaml", "grid": {"attack.name": ["batch", "data"]},
    "seeds": [1, 2], "defenses": ["strip", {"name": "fine_pruning", "epochs": 1}],
    "resources": {"cpus_per_cell": 1}, "retries": 0,
}
METRICS = ("clean_accuracy", "asr", "robust_accuracy", "backdoor_accuracy", "clean_loss")


def write_grid(folder: Path, grid: dict[str, Any], base: dict[str, Any] = BASE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump({**grid, "base": str(folder / "base.yaml")}))
    return path


def figures(sweep_dir: Path) -> dict[str, Any]:
    """Every cell's metrics and defense figures, without timings."""
    out = {}
    for run in sorted((sweep_dir / "runs").iterdir()):
        s = json.loads((run / "summary.json").read_text())
        defenses = {k: {f: v for f, v in d.items() if f not in ("seconds", "peak_memory_mb")}
                    for k, d in s.get("defenses", {}).items()}
        out[run.name] = ({k: s[k] for k in METRICS}, defenses)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grid, run once on the local engine with two workers."""
    folder = tmp_path_factory.mktemp("sweep")
    manifest = sweep(write_grid(folder, GRID), folder / "out", "local", workers=2, quiet=True)
    assert manifest["counts"] == {"completed": 4}
    return folder / "out" / "tiny"


def test_every_cell_is_a_run_folder_with_its_defenses(finished):
    manifest = json.loads((finished / "manifest.json").read_text())
    assert len(manifest["cells"]) == 4
    for cell_id, entry in manifest["cells"].items():
        run = finished / entry["run_dir"]
        assert run.name == cell_id and cell_id.startswith(f"{entry['label']}-s{entry['seed']}-")
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        assert set(entry["defenses"].values()) == {"completed"}
        assert (finished / "logs" / f"{cell_id}.log").stat().st_size > 0
        assert {p.name for p in (run / "defenses").iterdir()} == set(entry["defenses"])


def test_a_relaunch_recomputes_nothing(finished, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()
              and "runs" in p.parts}
    start = time.perf_counter()
    assert main(["sweep", str(finished.parent.parent / "grid.yaml"), "--out",
                 str(finished.parent)]) == 0
    assert time.perf_counter() - start < 30
    assert "4 already complete" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_ray_gives_the_local_numbers(finished, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifest = sweep(write_grid(tmp_path, GRID), tmp_path / "out", "ray", quiet=True)
    finally:
        ray.shutdown()
    assert manifest["counts"] == {"completed": 4}
    assert figures(tmp_path / "out" / "tiny") == figures(finished)


def test_a_new_seed_makes_only_new_cells(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out / "tiny")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "tiny" / "runs").rglob("*")}
    grid = write_grid(tmp_path, {**GRID, "seeds": [1, 2, 3]})
    manifest = sweep(grid, out, "local", workers=2, quiet=True)
    assert manifest["counts"] == {"completed": 6}
    assert len(list((out / "tiny" / "runs").iterdir())) == 6
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_a_failing_cell_does_not_stop_the_others(tmp_path, capsys):
    grid = {**GRID, "grid": {}, "seeds": [1],
            "cases": [{"name": "fine", "set": {}},
                      {"name": "diverges", "set": {"train.lr": 1.0e12}}]}
    code = main(["sweep", str(write_grid(tmp_path, grid)), "--out", str(tmp_path / "out")])
    assert code == 1
    manifest = json.loads((tmp_path / "out" / "tiny" / "manifest.json").read_text())
    status = {e["label"]: (e["status"], e["error"]) for e in manifest["cells"].values()}
    assert status["fine"] == ("completed", None)
    assert status["diverges"][0] == "failed" and "diverged" in status["diverges"][1]
    assert "diverges seed 1: failed" in capsys.readouterr().out


def test_a_killed_sweep_continues_without_redoing_finished_cells(tmp_path):
    grid = write_grid(tmp_path, {**GRID, "seeds": [1, 2, 3]})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "backdoors", "sweep", str(grid), "--out",
                             str(out), "--quiet"], start_new_session=True)
    manifest = out / "tiny" / "manifest.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if manifest.is_file() and json.loads(manifest.read_text())["counts"].get("completed"):
            break
        assert proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    data = json.loads(manifest.read_text())
    done = [e["run_dir"] for e in data["cells"].values() if e["status"] == "completed"]
    assert 1 <= len(done) < 6
    stamps = {p: p.stat().st_mtime_ns for d in done for p in (out / "tiny" / d).rglob("*")}
    assert sweep(grid, out, "local", workers=2, quiet=True)["counts"] == {"completed": 6}
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


@pytest.mark.parametrize("change, needle", [
    (lambda g: g.update(seeds=[1, 1]), "seeds"),
    (lambda g: g.update(grd={}), "did you mean 'grid'"),
    (lambda g: g.update(grid={"attack.name": "batch"}), "non-empty list"),
    (lambda g: g.update(grid={"attack.nme": ["batch"]}), "cell 'batch' (seed 1)"),
    (lambda g: g.update(grid={"synthesizer.name": ["patern"]}), "did you mean 'pattern'"),
    (lambda g: g.update(defenses=["stirp"]), "did you mean 'strip'"),
    (lambda g: g.update(cases=[{"name": "a", "sett": {}}]), "unknown key 'sett'"),
    (lambda g: g.update(base="missing.yaml"), "base config not found"),
    (lambda g: g.update(resources={"gpus": 1}), "expected one of: cpus_per_cell"),
    (lambda g: g.update(grid={"seed": [1, 1]}), "trains the same config"),
])
def test_bad_grid_files_are_one_line_before_anything_runs(change, needle, tmp_path, capsys):
    grid = copy.deepcopy(GRID)
    path = write_grid(tmp_path, grid)
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_confidence_intervals_match_hand_computed_values():
    est = estimate([1.0, 2.0, 3.0])
    assert est.mean == 2.0 and est.n == 3
    assert est.half_width == pytest.approx(4.302653 / 3**0.5, rel=1e-6)  # t(0.975, 2) s/sqrt(n)
    assert estimate([0.5]).half_width is None and estimate([None, float("nan")]) is None


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1


def test_the_report_has_tables_figures_and_intervals(finished, tmp_path):
    paths = report([finished], tmp_path / "r.html", ("html", "md", "csv"))
    assert [p.suffix for p in paths] == [".html", ".md", ".csv"]
    page = (tmp_path / "r.html").read_text()
    parser = _Tags()
    parser.feed(page)
    assert parser.tags["table"] >= 6 and parser.tags["img"] >= 4  # heatmaps, curves, scores
    assert "src=\"http" not in page  # self-contained
    md = (tmp_path / "r.md").read_text()
    assert "fine_pruning (epochs=1)" in md and "(n=2)" in md and "±" in md
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("table,attack,defense,mean") and len(lines) > 20


def test_the_report_of_a_sweep_shows_only_the_defenses_of_its_grid(finished, tmp_path):
    """A defense whose options the grid changed is run again under its new key; the old
    result stays in the run folder but leaves the sweep's report."""
    out = tmp_path / "out"
    shutil.copytree(finished, out / "tiny")
    grid = write_grid(tmp_path, {**GRID, "defenses": ["strip", {"name": "fine_pruning",
                                                                 "epochs": 2}]})
    sweep(grid, out, "local", workers=1, quiet=True)
    md = report([out / "tiny"], tmp_path / "r.md", ("md",))[0].read_text()
    assert "fine_pruning (epochs=2)" in md and "fine_pruning (epochs=1)" not in md
    runs = list((out / "tiny" / "runs").iterdir())
    assert all(len(list((r / "defenses").iterdir())) == 3 for r in runs)  # nothing deleted


def test_the_report_renders_in_a_browser(finished, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed")
    (html,) = report([finished], tmp_path / "r.html", ("html",))
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--window-size=1200,1600", f"--screenshot={shot}", html.as_uri()],
                   capture_output=True, timeout=120, check=False)
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    low, high = pixels.getextrema()
    assert high - low > 100  # text and figures, not a blank page


def test_show_prints_one_line_per_cell(finished, capsys):
    assert main(["show", str(finished)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all("completed" in line for line in lines[1:])


def test_reference_cells_are_backdoorbench_rows():
    """The bundled leaderboard is matched by dataset, model, attack, ratio and defense."""
    import csv

    from backdoors.report.reference import DATA, lookup

    rows = {(r["attack"], r["defense"]): r for r in csv.DictReader(DATA.open())
            if r["dataset"] == "cifar10" and r["model"] == "preactresnet18"
            and float(r["poison_ratio"]) == 0.1}
    badnets = {"task": {"name": "cifar10"}, "model": {"name": "preact_resnet18"},
               "synthesizer": {"name": "pattern"}, "attack": {"name": "data", "ratio": 0.1}}
    for defense, theirs in ((None, "no defense"), ("fine_pruning", "fp"), ("anp", "anp")):
        found = lookup(badnets, defense)
        assert found is not None
        assert found["asr"] == float(rows[("badnet", theirs)]["asr"])
    assert lookup(badnets, "strip") is None  # BackdoorBench has no STRIP cell
    assert lookup({**badnets, "task": {"name": "mnist"}}, None) is None
    blind = {**badnets, "attack": {"name": "blind"}}
    assert lookup(blind, None)["clean_accuracy"] == float(
        rows[("blind", "no defense")]["clean_accuracy"])
    # Input-aware's batch share is split into backdoor and cross-trigger rows; BackdoorBench's
    # ratio counts the backdoor rows (10% + 10% cross is its 10% cell).
    aware = {**badnets, "synthesizer": {"name": "input_aware"},
             "attack": {"name": "batch", "fraction": 0.2}}
    assert lookup(aware, None)["asr"] == float(rows[("inputaware", "no defense")]["asr"])
    half = lookup({**aware, "attack": {"name": "batch", "fraction": 0.1}}, None)
    assert half is not None and half["asr"] == 0.902  # their 5% row
