"""Shared fixtures: the tiny random LLaVA (built once per session) and sample images."""

from __future__ import annotations

import numpy as np
import pytest

from covipal.models import load_model


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-random-llava")


@pytest.fixture(scope="session")
def images():
    """Three RGB arrays of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    return [(rng.random(shape) * 255).astype(np.uint8) for shape in [(70, 50, 3), (40, 90, 3), (56, 56, 3)]]


QUESTIONS = [
    "What is on the table?",
    "How many people are in the picture? Answer with one word.",
    "Describe the image in detail.",
]


@pytest.fixture(scope="session")
def questions():
    return QUESTIONS
