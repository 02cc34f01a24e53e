"""The README's promises: its example synthesizer works and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from backdoors.batch import Batch
from backdoors.synthesizers import SYNTHESIZERS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_synthesizer_example_registers_and_triggers():
    block = re.search(r"## Adding a synthesizer.*?```python\n(.*?)```", README.read_text(),
                      re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    try:
        synth = SYNTHESIZERS.build("corner_square", {"size": 2}, "synthesizer")
        synth.bind((1, 8, 8), 10)
        out = synth.apply(Batch.make(torch.zeros(4, 1, 8, 8), torch.arange(4)), 0.5)
        assert out.poisoned.tolist() == [True, True, False, False]
        assert out.inputs[0, 0, -2:, -2:].eq(1).all() and out.inputs[2].eq(0).all()
        assert out.labels.tolist() == [0, 0, 2, 3]
    finally:
        SYNTHESIZERS._items.pop("corner_square", None)


def test_readme_commands_match_the_project():
    text = README.read_text()
    assert "pip install -e . && backdoors train configs/quickstart.yaml" in text
    assert 'pip install -e ".[test]" && pytest' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and "pytest" in ci


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys, one_thread):
    block = re.search(r"<!-- test: api -->\n```python\n(.*?)```", README.read_text(),
                      re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the example writes runs/ where it is started
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text(
        (README.parent / "configs" / "quickstart.yaml").read_text())
    exec(compile(block, "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out
    assert "clean 0.9" in out and "STRIP AUROC" in out
    defenses = tmp_path / "runs" / "api-example" / "defenses"
    assert [p.name.split("-")[0] for p in defenses.iterdir()] == ["strip"]
