"""The easy-VQA evaluation harness, on tiny-random-llava (fast) and through its CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_easy_vqa

from covipal.budget import ALL, parse_budgets
from covipal.errors import CovipalError
from covipal.eval import answer_first_tokens, evaluate, format_table, parse_strategies
from covipal.eval import main as eval_main
from covipal.strategies import make_strategy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = requires_easy_vqa


@pytest.fixture(scope="module")
def examples():
    from covipal.training.data import easy_vqa

    return easy_vqa.sample(easy_vqa.load_split("test"), 12, seed=0)


def test_sample_is_seeded_and_answers_known(examples):
    from covipal.training.data import easy_vqa

    again = easy_vqa.sample(easy_vqa.load_split("test"), 12, seed=0)
    assert again == examples and len(examples) == 12
    assert all(e.answer in easy_vqa.answers() and e.image.is_file() for e in examples)


def test_answer_tokens_continue_the_prompt(tiny):
    tokenizer = tiny.processor.tokenizer
    firsts = answer_first_tokens(tiny, ["yes", "no"])
    prompt = tiny.processor.render("?")  # ends with "ASSISTANT:", so the answer follows a space
    for answer, first in zip(["yes", "no"], firsts):
        ids = tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]
        assert first == ids[len(tokenizer(prompt, add_special_tokens=False)["input_ids"])]


def test_full_budget_equals_the_unpruned_row(tiny, examples):
    from covipal.training.data import easy_vqa

    strategies = {"uniform": make_strategy("uniform"), "random": make_strategy("random")}
    records = evaluate(tiny, examples, strategies, [64, 4], easy_vqa.answers(), batch_size=5)
    by_key = {(r.strategy, r.budget): r for r in records}
    assert len(records) == 1 + 2 * 2 and all(r.n == 12 for r in records)
    assert by_key[("uniform", 64)].accuracy == by_key[("random", 64)].accuracy == by_key[("none", ALL)].accuracy
    assert all(0 <= r.accuracy <= 1 for r in records)


def test_predictions_match_a_direct_forward(tiny, examples):
    """The harness's pick equals the argmax over answer first-tokens of a plain HF forward."""
    from covipal.training.data import easy_vqa

    answers = easy_vqa.answers()
    candidates = torch.tensor(answer_first_tokens(tiny, answers))
    correct = 0
    for example in examples:
        batch = tiny.processor([example.image], [example.question])
        with torch.no_grad():
            logits = tiny.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   pixel_values=batch.pixel_values).logits[0, -1]
        correct += answers[int(logits[candidates].argmax())] == example.answer
    record = evaluate(tiny, examples, {}, [], answers, batch_size=4)[0]
    assert record.accuracy == correct / len(examples)


def test_table_layout():
    from covipal.eval import EvalRecord

    records = [EvalRecord("none", ALL, 0.8, 10), EvalRecord("uniform", 32, 0.6, 10),
               EvalRecord("uniform", 16, 0.5, 10)]
    table = format_table(records, ("yes", 0.4))
    assert "| strategy | k=32 | k=16 | all tokens | majority |" in table
    assert "| uniform | 60.0 | 50.0 | 80.0 | 40.0 |" in table


def test_parsers():
    assert parse_budgets("all, 64,8") == [ALL, 64, 8]
    assert parse_strategies("knorm,uniform") == ["knorm", "uniform"]
    with pytest.raises(CovipalError, match="--budgets takes positive integers and 'all', got '0'"):
        parse_budgets("all,0")
    with pytest.raises(CovipalError, match="unknown strategy 'cls'"):
        parse_strategies("uniform,cls")


def test_cli_json_records(tmp_path):
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "covipal.eval", "--model", "tiny-random-llava", "--budgets",
                             "all,16,32", "--strategies", "uniform,knorm,cdpruner,dart", "--relevance-weight", "0.3",
                             "--limit", "6", "--json", str(out),
                             "--plot", str(tmp_path / "plot.png")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| strategy | k=16 | k=32 | all tokens | majority |" in result.stdout
    data = json.loads(out.read_text())
    assert [(r["strategy"], r["budget"], r["n"]) for r in data["records"]] == [
        ("none", "all", 6), *((name, k, 6) for name in ("uniform", "knorm", "cdpruner", "dart") for k in (16, 32))]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(data["baselines"]) == {"all_tokens", "majority"} and data["baselines"]["majority"]["answer"] == "yes"


@pytest.mark.parametrize("args, message", [
    (["--budgets", "all,-1"], "--budgets takes positive integers and 'all', got '-1'"),
    (["--strategies", "magic"], "unknown strategy 'magic'"),
    (["--limit", "0"], "argument --limit: expected a positive integer, got 0"),
    (["--strategies", "cdpruner", "--relevance-weight", "-0.1"],
     "argument --relevance-weight: expected a number in [0, 1], got -0.1"),
])
def test_cli_errors(in_process, args, message):
    result = in_process(eval_main, "--model", "tiny-random-llava", *args)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
