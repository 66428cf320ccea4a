"""mini-llava: offline loading, the committed projector, answers in words, and a small evaluation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_mini

from covipal.eval import answer_first_tokens, evaluate
from covipal.models.mini_llava import PPM_DIR, PROJECTOR_DIR, MiniLlavaProjector
from covipal.training.data import easy_vqa

ROOT = Path(__file__).resolve().parents[1]
PROJECTOR_SHA256 = "02b490102faf42fdb4b4ec4b0994dbfd0510a75daf2f4450252ad962263b7f94"
PPM_SHA256 = "dc9bba7e3d6a7353f265f18169e1b874d1281a4cb0f0dc44522f366fdd5eb853"
LARGE_PPM_DIR = PPM_DIR.parent / "mini-llava-ppm-large"  # the teacher the bundled PPM was distilled from
LARGE_PPM_SHA256 = "1d7f764f70781e1f760f9df469d418cbb3094706f63768ab5040b7b11a9a3867"

pytestmark = requires_mini


@pytest.fixture(scope="module")
def mini():
    from covipal.models import load_model

    return load_model("mini-llava")


def test_projector_checkpoint_shape_and_checksum():
    weights = PROJECTOR_DIR / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == PROJECTOR_SHA256
    record = json.loads((PROJECTOR_DIR / "config.json").read_text())
    assert record["command"].startswith("python -m covipal.train_projector ") and record["seed"] == 0
    assert "--token-dropout 0.5" in record["command"]  # trained to answer from pruned images
    projector = MiniLlavaProjector.load(PROJECTOR_DIR)
    shapes = {name: list(t.shape) for name, t in projector.state_dict().items()}
    assert shapes == {"linear_1.weight": [576, 112], "linear_1.bias": [576],
                      "linear_2.weight": [576, 576], "linear_2.bias": [576]}


def test_bundled_ppm_is_the_default_for_eval_and_export(mini):
    from covipal.modeling_ppm import PruningModule, weights_sha256
    from covipal.models import bundled_ppm
    from covipal_export.export.pruning_choice import choose_pruning

    directory = bundled_ppm("mini-llava")
    assert directory == PPM_DIR and bundled_ppm("tiny-random-llava") is None
    assert weights_sha256(directory) == PPM_SHA256
    record = json.loads((directory / "config.json").read_text())["metadata"]
    assert record["command"].startswith("python -m covipal.train --model mini-llava --stage 1")
    assert record["seed"] == 0 and record["labels"] == "ppm" and record["target"] == "normal-rank"
    assert record["teacher_ppm"] == {"path": "covipal/checkpoints/mini-llava-ppm-large",
                                     "weights_sha256": LARGE_PPM_SHA256}
    assert weights_sha256(LARGE_PPM_DIR) == LARGE_PPM_SHA256
    teacher = json.loads((LARGE_PPM_DIR / "config.json").read_text())["metadata"]
    assert teacher["labels"] == "answer-gradient" and teacher["target"] == "normal-rank"
    ppm = PruningModule.load(directory)
    assert (ppm.config.hidden_size, ppm.config.grid_size, ppm.config.dim, ppm.config.num_blocks) == (576, 14, 128, 1)
    strategy, pruning = choose_pruning(mini, None, None, 32, "keep", 0)  # export.py --model mini-llava, no strategy
    assert pruning.strategy == "ppm" and pruning.ppm.checkpoint == str(PPM_DIR) and "bundled" in pruning.note
    assert choose_pruning(mini, "uniform", None, 32, "keep", 0)[1].strategy == "uniform"


def test_model_layout(mini):
    assert mini.num_visual_tokens == 196 and mini.hidden_size == 576 and mini.image_size == 224
    assert mini.text_config.num_hidden_layers == 30
    ids = mini.processor.tokenize("what color is the shape?")
    assert ids.count(mini.image_token_id) == 196
    assert mini.processor.render("q?") == "<|im_start|>user\n<repo_name>\nq?<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        visual = mini.encode_images(torch.zeros(2, 3, 224, 224))
    assert visual.shape == (2, 196, 576)


def test_answer_first_tokens_are_distinct(mini):
    firsts = answer_first_tokens(mini, easy_vqa.answers())
    assert len(set(firsts)) == 13


def test_small_evaluation_beats_the_majority_answer_and_survives_pruning(mini):
    """All tokens beat always answering "yes"; the bundled PPM at 32 of 196 tokens keeps >= 90% of that
    (the first projector, trained without token dropout, kept 74% on 200 questions)."""
    from covipal.modeling_ppm import PruningModule
    from covipal.models import bundled_ppm
    from covipal.strategies import make_strategy

    examples = easy_vqa.sample(easy_vqa.load_split("test"), 64, seed=0)
    ppm = make_strategy("ppm", ppm=PruningModule.load(bundled_ppm("mini-llava")))
    full, pruned = evaluate(mini, examples, {"ppm": ppm}, [32], easy_vqa.answers())
    majority = sum(e.answer == "yes" for e in examples) / len(examples)
    assert full.n == 64 and full.accuracy >= majority + 0.15, (full, majority)
    assert pruned.budget == 32 and pruned.accuracy >= 0.9 * full.accuracy, (full, pruned)


def test_cli_answers_in_a_real_word_offline():
    """`python -m covipal` on a bundled easy-VQA test image, with the Hub switched off."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "covipal", str(ROOT / "covipal/assets/easy-vqa-test-0.png"), "what is the red shape?",
         "--model", "mini-llava", "--max-new-tokens", "4", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["answer"] in easy_vqa.answers() and record["tokens_total"] == 196
