"""Command lines as users type them: answers, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from covipal.__main__ import main as covipal_main

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "covipal" / "assets" / "shapes.png")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_answers_with_pruning_as_json():
    result = run("-m", "covipal", IMAGE, "What is on the table?", "--budget", "16", "--strategy", "text-sim",
                 "--max-new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["tokens_kept"] == 16 and record["tokens_total"] == 64 and record["strategy"] == "text-sim"
    assert record["kept_index"] == sorted(set(record["kept_index"])) and len(record["kept_index"]) == 16
    assert record["new_tokens"] <= 6 and isinstance(record["answer"], str)


def test_answers_in_text_with_a_summary_line():
    result = run("-m", "covipal", IMAGE, "What is on the table?", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "64/64 visual tokens kept (no pruning)" in result.stderr


def test_help_explains_every_flag():
    result = run("-m", "covipal", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--model-path", "--strategy", "--budget", "--ppm", "--position-policy",
                 "--max-new-tokens", "--temperature", "--top-p", "--seed", "--json", "--relevance-weight"):
        assert flag in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "argument --budget: expected a positive integer, got 0"),
    (["--budget", "-4"], "argument --budget: expected a positive integer, got -4"),
    (["--model", "llava-9b"], "argument --model: invalid choice: 'llava-9b'"),
    (["--strategy", "magic"], "argument --strategy: invalid choice: 'magic'"),
    (["--strategy", "ppm", "--budget", "8"], "strategy 'ppm' needs a trained PPM checkpoint"),
    (["--ppm", "/nonexistent/ppm"], "no PPM checkpoint at /nonexistent/ppm"),
    (["--strategy", "cdpruner", "--relevance-weight", "1.5"],
     "argument --relevance-weight: expected a number in [0, 1], got 1.5"),
])
def test_bad_arguments(in_process, args, message):
    assert_one_line_error(in_process(covipal_main, IMAGE, "What is it?", *args), message)


def test_a_bad_argument_is_one_line_from_the_command_too():
    assert_one_line_error(run("-m", "covipal", IMAGE, "What is it?", "--budget", "0"),
                          "argument --budget: expected a positive integer, got 0")


def test_bad_images_and_questions(in_process, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    assert_one_line_error(in_process(covipal_main, "/nonexistent.png", "What?"), "image not found: /nonexistent.png")
    assert_one_line_error(in_process(covipal_main, str(not_image), "What?"), f"cannot read image {not_image}")
    assert_one_line_error(in_process(covipal_main, IMAGE, ""), "the question is empty")


def test_missing_llava_checkpoint(in_process, tmp_path):
    assert_one_line_error(in_process(covipal_main, IMAGE, "What?", "--model", "llava-1.5-7b", "--model-path",
                                     str(tmp_path)), f"llava-1.5-7b: no checkpoint at {tmp_path}")
