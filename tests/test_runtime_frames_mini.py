"""Frames on mini-llava (a real model): BGR frames, and 8 questions about one frame with the vision and prefix
caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import requires_mini
from PIL import Image

from covipal_export.runtime import Pipeline

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "covipal" / "assets" / "easy-vqa-test-0.png"  # a red triangle
QUESTIONS = ["what color is the shape?", "what is the red shape?", "what shape is in the image?",
             "is there a triangle in the image?", "is there a circle?", "is the shape red?", "is the shape blue?",
             "what is the shape?"]

pytestmark = requires_mini


@pytest.fixture(scope="module")
def uncached(mini_demo_export) -> Pipeline:
    return Pipeline.from_dir(mini_demo_export, backend="ort", vision_cache_mb=0, prefix_cache_mb=0)


def test_bgr_frames(uncached):
    bgr = np.asarray(Image.open(IMAGE).convert("RGB"))[..., ::-1]  # what OpenCV gives
    question = QUESTIONS[0]
    assert uncached.generate(str(IMAGE), question).answer == "red"
    assert uncached.generate(bgr, question, color="bgr").answer == "red"
    assert uncached.generate(bgr, question).answer == "blue"  # BGR passed as RGB: red and blue swapped


@pytest.mark.parametrize("budget", [64, "all"])
def test_eight_questions_about_one_frame(mini_demo_export, uncached, budget):
    """The encoder runs once; the prefix KV (text before the image + kept tokens) is reused where the PPM keeps
    the tokens an earlier question kept (every time at "all"); the tokens are those of uncached calls."""
    cached = Pipeline.from_dir(mini_demo_export, backend="ort")
    frame = np.asarray(Image.open(IMAGE).convert("RGB"))
    selections = []
    for i, question in enumerate(QUESTIONS):
        result = cached.generate(frame, question, budget=budget, max_new_tokens=8, ignore_eos=True)
        timings = result.timings_ms
        assert (timings.vision_cache_hits, timings.vision_cache_misses) == ((0, 1) if i == 0 else (1, 0))
        kept = tuple(result.kept_index[0].tolist())
        assert timings.prefix_cache_hits == int(kept in selections) == 1 - timings.prefix_cache_misses
        selections.append(kept)
        want = uncached.generate(frame, question, budget=budget, max_new_tokens=8, ignore_eos=True)
        assert (result.answer, result.sequences.tolist()) == (want.answer, want.sequences.tolist())
    if budget == "all":
        assert len(set(selections)) == 1
    else:  # the PPM reads each question: 6 selections for these 8, so both hits and misses happen
        assert 1 < len(set(selections)) < len(QUESTIONS)
