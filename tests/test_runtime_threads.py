"""One `Pipeline` shared by threads (issue 18 step 0, issue 19 step 5): every caller gets its own answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from covipal_export.runtime import Pipeline

NEW_TOKENS = 12  # random weights: every call decodes all of them (ignore_eos as well, to be sure)


@pytest.fixture(scope="module")
def pipes(tiny_export: Path) -> dict[str, Pipeline]:
    """Per backend, both caches off: every call runs every stage, so threads run them at the same time."""
    return {name: Pipeline.from_dir(tiny_export, backend=name, threads=1, vision_cache_mb=0, prefix_cache_mb=0)
            for name in ("ort", "torch")}


@pytest.fixture(scope="module")
def pipe(pipes) -> Pipeline:
    return pipes["ort"]


def calls(images, questions, count: int) -> list[tuple]:
    """`count` different (image, question, budget) calls: answers that differ call by call."""
    rng = np.random.default_rng(1)
    return [(images[i % 3], f"{questions[i % 3]} ({i})", int(rng.integers(2, 65))) for i in range(count)]


def answer(pipe: Pipeline, call: tuple) -> list[int]:
    image, question, budget = call
    result = pipe.generate(image, question, budget=budget, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return result.sequences[0].tolist()


@pytest.mark.parametrize("backend, threads, per_thread", [("ort", 8, 1), ("ort", 4, 10), ("torch", 8, 1)])
def test_threads_get_the_tokens_of_serial_calls(pipes, images, questions, backend, threads, per_thread):
    pipe = pipes[backend]
    work = calls(images, questions, threads * per_thread)
    serial = [answer(pipe, call) for call in work]
    assert all(len(tokens) == NEW_TOKENS for tokens in serial)
    assert len({tuple(tokens) for tokens in serial}) > len(work) // 2  # the calls really differ
    with ThreadPoolExecutor(threads) as pool:
        shared = list(pool.map(lambda call: answer(pipe, call), work))
    assert shared == serial


def test_threads_share_batches_and_streams(pipe, images, questions):
    """Batched calls and streams interleaved from 4 threads: each gets its serial answer."""
    def batch():
        return pipe.generate(images, questions, budget=16, max_new_tokens=NEW_TOKENS, ignore_eos=True).answers

    def stream():
        return "".join(pipe.generate(images[2], "Describe it.", budget=5, max_new_tokens=NEW_TOKENS, stream=True,
                                     ignore_eos=True))

    want = [batch(), stream()] * 4
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda f: f(), [batch, stream] * 4))
    assert got == want


def test_threads_share_the_vision_cache(pipe, tiny_export, images, questions):
    """A fresh cache filled by 4 threads at once (hits and misses racing) gives the answers of uncached calls."""
    cached = Pipeline.from_dir(tiny_export, backend="ort", threads=1)
    work = calls(images, questions, 40)
    with ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(lambda call: answer(cached, call), work))
    assert shared == [answer(pipe, call) for call in work]
    assert len(cached.vision_cache) == 3
