"""The prefix KV cache (issue 19): more questions about a frame prefill only their text after the image, and get
the tokens of calls that prefill the whole prompt. tiny-random-llava; mini-llava in test_runtime_frames_mini.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from covipal_export.runtime import Pipeline

NEW_TOKENS = 10  # random weights: every call decodes all of them (ignore_eos as well, to be sure)
QUESTIONS = ["What is on the table?", "How many people are in the picture? Answer with one word.",
             "Describe the image in detail.", "Is it red?", "Where is the cat sitting right now in this photo?",
             "What colour is the car?", "Count the shapes.", "Why?"]


@pytest.fixture(scope="module")
def uniform_export(tmp_path_factory) -> Path:
    """tiny-random-llava with the training-free `uniform` rule in ppm.onnx: a selection that ignores the question."""
    from covipal_export.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("tiny-uniform") / "tiny-b8-uniform"
    return export_model(ExportOptions(model="tiny-random-llava", budget=8, out=out, strategy="uniform",
                                      verify=False)).directory


def pipelines(directory: Path, backend: str) -> tuple[Pipeline, Pipeline]:
    """Both caches on (the default), and both off: every call encodes the frame and prefills its whole prompt."""
    return (Pipeline.from_dir(directory, backend=backend, threads=1),
            Pipeline.from_dir(directory, backend=backend, threads=1, vision_cache_mb=0, prefix_cache_mb=0))


def ask(pipe: Pipeline, image, question: str, **options) -> tuple[list[int], tuple[int, int]]:
    """The tokens of one call, and its (prefix cache hits, misses)."""
    result = pipe.generate(image, question, max_new_tokens=NEW_TOKENS, ignore_eos=True, **options)
    timings = result.timings_ms
    return result.sequences[0].tolist(), (timings.prefix_cache_hits, timings.prefix_cache_misses)


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("budget, policy", [("all", "keep"), (5, "keep"), (5, "compact")])
def test_eight_questions_about_a_frame_reuse_its_prefix(uniform_export, images, backend, budget, policy):
    cached, uncached = pipelines(uniform_export, backend)
    got, counts, want = [], [], []
    for question in QUESTIONS:
        tokens, count = ask(cached, images[0], question, budget=budget, position_policy=policy)
        got.append(tokens)
        counts.append(count)
        want.append(ask(uncached, images[0], question, budget=budget, position_policy=policy)[0])
    assert counts == [(0, 1)] + [(1, 0)] * 7
    assert got == want
    assert len({tuple(tokens) for tokens in want}) > 4  # the questions' own text changes the answers
    assert len(cached.prefix_cache) == 1 and len(uncached.prefix_cache) == 0


def test_a_different_selection_or_position_misses(tiny_export, images):
    """The key is the frame, the kept indices and their positions: what differs misses and is answered right."""
    cached, uncached = pipelines(tiny_export, "ort")
    calls = [(0, 8, "keep"), (0, 6, "keep"), (0, 8, "compact"), (1, 8, "keep"), (0, 8, "keep"),
             (0, "all", "keep"), (0, "all", "compact")]  # every token kept: keep and compact give one prefix
    counts = []
    for image, budget, policy in calls:
        tokens, count = ask(cached, images[image], QUESTIONS[0], budget=budget, position_policy=policy)
        assert tokens == ask(uncached, images[image], QUESTIONS[0], budget=budget, position_policy=policy)[0]
        counts.append(count)
    assert counts == [(0, 1)] * 4 + [(1, 0), (0, 1), (1, 0)]


def test_a_batch_prefills_as_without_the_cache(tiny_export, images):
    cached, uncached = pipelines(tiny_export, "ort")
    ask(cached, images[0], QUESTIONS[0], budget=8)
    result = cached.generate([images[0], images[0]], QUESTIONS[1:3], budget=8, max_new_tokens=NEW_TOKENS,
                             ignore_eos=True)
    assert (result.timings_ms.prefix_cache_hits, result.timings_ms.prefix_cache_misses) == (0, 2)
    want = uncached.generate([images[0], images[0]], QUESTIONS[1:3], budget=8, max_new_tokens=NEW_TOKENS,
                             ignore_eos=True)
    np.testing.assert_array_equal(result.sequences, want.sequences)


def test_the_cache_is_bounded_in_bytes_least_recently_used_out(tiny_export, images):
    probe = Pipeline.from_dir(tiny_export, backend="ort", threads=1)
    ask(probe, images[0], QUESTIONS[0], budget=8)
    entry = probe.prefix_cache.nbytes
    decoder, ids = probe.manifest.decoder, probe.processor.tokenize(QUESTIONS[0])
    length = ids.index(probe.manifest.model.image_token_id) + 8  # the text before the image, the 8 kept tokens
    assert entry == length * 2 * decoder.num_layers * decoder.num_kv_heads * decoder.head_dim * 4  # K, V in fp32
    one = Pipeline.from_dir(tiny_export, backend="ort", threads=1, prefix_cache_mb=1.5 * entry / 2**20)
    counts = [ask(one, images[i], QUESTIONS[i], budget=8)[1] for i in (0, 0, 1, 0)]
    assert counts == [(0, 1), (1, 0), (0, 1), (0, 1)] and (len(one.prefix_cache), one.prefix_cache.nbytes) == (1, entry)
    none = Pipeline.from_dir(tiny_export, backend="ort", threads=1, prefix_cache_mb=0.5 * entry / 2**20)
    counts = [ask(none, images[0], question, budget=8)[1] for question in QUESTIONS[:2]]
    assert counts == [(0, 1), (0, 1)] and len(none.prefix_cache) == 0


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_threads_share_the_cache(uniform_export, images, backend):
    """8 questions about each of 2 frames at 2 budgets, from 4 threads on an empty cache (hits and misses race):
    every call gets the tokens of a serial call without caches."""
    cached, uncached = pipelines(uniform_export, backend)
    work = [(images[i % 2], QUESTIONS[i // 4], ("all", 5)[i // 2 % 2]) for i in range(32)]  # 4 prefixes, 8 each
    with ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(lambda call: ask(cached, call[0], call[1], budget=call[2]), work))
    assert [tokens for tokens, _ in shared] == [ask(uncached, *call[:2], budget=call[2])[0] for call in work]
    hits, misses = np.sum([count for _, count in shared], axis=0)
    assert hits + misses == 32 and hits >= 32 - 4 * 4 and len(cached.prefix_cache) == 4  # at most 4 racing misses
