"""easy-VQA (PyPI `easy-vqa`, MIT): 64x64 drawings of one coloured shape, 13 one-word answers.

Train: 4,000 images / 38,575 questions; test: 1,000 images / 9,673 questions.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from covipal.errors import CovipalError

Split = Literal["train", "test"]


@dataclass(frozen=True)
class VQAExample:
    image: Path
    question: str
    answer: str


def _module():
    if importlib.util.find_spec("easy_vqa") is None:
        raise CovipalError("the easy-vqa data set is not installed: run `make setup` or `pip install easy-vqa`")
    import easy_vqa

    return easy_vqa


def answers() -> list[str]:
    """The 13 answers, in the package's order."""
    return list(_module().get_answers())


def load_split(split: Split) -> list[VQAExample]:
    """All questions of a split, in the package's order."""
    data = _module()
    if split == "train":
        questions, labels, image_ids = data.get_train_questions()
        paths = data.get_train_image_paths()
    elif split == "test":
        questions, labels, image_ids = data.get_test_questions()
        paths = data.get_test_image_paths()
    else:
        raise CovipalError(f"unknown easy-vqa split {split!r}; choose train or test")
    return [VQAExample(Path(paths[i]), q, a) for q, a, i in zip(questions, labels, image_ids)]


def sample(examples: list[VQAExample], limit: int | None, seed: int = 0) -> list[VQAExample]:
    """A seeded random subset of `limit` examples (all of them, shuffled, when limit is None)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order[:limit]]


def majority_answer(examples: list[VQAExample]) -> str:
    return Counter(e.answer for e in examples).most_common(1)[0][0]
