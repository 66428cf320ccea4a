"""`python -m covipal_export.bench.pipeline_eval`: the pipeline answers easy-VQA exactly as the PyTorch harness does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import requires_mini

from covipal.cli import run as run_cli
from covipal_export.bench import pipeline_eval
from covipal_export.runtime import Pipeline

pytestmark = requires_mini


@pytest.fixture(scope="module")
def export_dir(mini_demo_export) -> Path:
    return mini_demo_export


def test_pipeline_answers_equal_covipal_eval(export_dir):
    from covipal.training.data import easy_vqa

    pipe = Pipeline.from_dir(export_dir, backend="ort")
    examples = easy_vqa.sample(easy_vqa.load_split("test"), 16, seed=0)  # covipal.eval --limit 16's questions
    result = pipeline_eval.compare(pipe, examples)
    assert (result.strategy, result.budget, result.position_policy, result.n) == ("ppm", 64, "keep", 16)
    assert len(result.pipeline_answers) == 16 and result.pipeline_answers == result.reference_answers
    assert result.differ == 0 and result.pipeline_accuracy == result.reference_accuracy
    assert result.pipeline_accuracy > 0.5  # well above the 37 % majority answer: the scoring picks real answers


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pipeline_eval", "--engine-dir", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exit_:
        run_cli(pipeline_eval.main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and lines == [f"error: engine directory not found: {tmp_path / 'nowhere'}"]


def test_fidelity_puts_a_quantized_copy_beside_its_source(export_dir, tmp_path, capsys):
    import json
    import shutil

    from covipal_export.bench import fidelity
    from covipal_export.export.quantize import QuantOptions, quantize_export
    from covipal_export.manifest import load_manifest

    int4 = tmp_path / "int4"
    shutil.copytree(export_dir, int4)
    quantize_export(int4, load_manifest(int4), QuantOptions("int4"))
    out = tmp_path / "fidelity.json"
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: fidelity.main([str(export_dir), str(int4), "--budgets", "all,16", "--limit", "8",
                                       "--json", str(out)]))
    assert exit_.value.code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["weights"], r["budget"]) for r in rows] == [("fp32", 196), ("fp32", 16), ("int4 rtn, block 32", 196),
                                                            ("int4 rtn, block 32", 16)]
    assert rows[0]["agreement"] == rows[1]["agreement"] == 1.0
    for row, first in zip(rows[2:], rows[:2]):
        same = sum(a == b for a, b in zip(row["answers"], first["answers"]))
        assert row["agreement"] == same / 8 and row["n"] == 8
    table = capsys.readouterr().out
    assert "| int4 rtn, block 32 | 16 |" in table and "| fp32 | 196 |" in table
