"""The runtime on mini-llava (a real model): the demo answer, parity with PyTorch, decode cost vs cache length."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_mini

from covipal.generation import SamplingConfig, generate_from_batch
from covipal.pruning import PrunedPrompt
from covipal_export.runtime import Pipeline
from covipal_export.runtime.reference import reference_from_manifest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "covipal" / "assets"
IMAGE = str(ASSETS / "easy-vqa-test-0.png")

pytestmark = requires_mini


@pytest.fixture(scope="module")
def export_dir(mini_demo_export) -> Path:
    return mini_demo_export


@pytest.fixture(scope="module")
def pipe(export_dir) -> Pipeline:
    return Pipeline.from_dir(export_dir, backend="ort")


@pytest.fixture(scope="module")
def reference(pipe):
    return reference_from_manifest(pipe.manifest)


def test_run_trt_answers_the_demo_question(export_dir):
    result = subprocess.run([sys.executable, "run_trt.py", IMAGE, "what is the red shape?", "--engine-dir",
                             str(export_dir), "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "triangle"
    assert "64/196 visual tokens kept" in result.stderr


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("budget", [196, 49, 20])  # full, 25 %, 10 % of 196
def test_ort_tokens_equal_pytorch_pruned_generate(pipe, reference, budget, size):
    model, strategy = reference
    images = [IMAGE, str(ASSETS / "easy-vqa-test-3.png"), str(ASSETS / "shapes.png")][:size]
    questions = ["Describe the image.", "what color is the shape?", "what is the red shape?"][:size]
    result = pipe.generate(images, questions, budget=budget, max_new_tokens=32)
    want = generate_from_batch(model, pipe.processor(images, questions), strategy=strategy, budget=budget,
                               sampling=SamplingConfig(max_new_tokens=32))
    np.testing.assert_array_equal(result.sequences, want.sequences.numpy())
    assert result.answers == want.texts


def decode_ms_per_token(pipe: Pipeline, past: int, steps: int = 8) -> float:
    """Mean ms of one decode step after a synthetic prompt of `past` tokens (batch 1)."""
    rng = np.random.default_rng(0)
    hidden = pipe.manifest.model.hidden_size
    prompt = PrunedPrompt(torch.from_numpy((rng.standard_normal((1, past, hidden)) * 0.02).astype(np.float32)),
                          torch.ones(1, past, dtype=torch.long), torch.arange(past)[None], torch.zeros(1, 0).long(),
                          None)
    backend = pipe.backend
    _, cache = backend.prefill(prompt)
    token, times = torch.tensor([42]), []
    for i in range(steps):
        mask, position = torch.ones(1, past + i + 1, dtype=torch.long), torch.tensor([[past + i]])
        start = time.perf_counter()
        backend.step(cache, token, mask, position)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def test_decode_cost_grows_slowly_with_the_cache(pipe):
    short, long = decode_ms_per_token(pipe, 200), decode_ms_per_token(pipe, 600)
    print(f"decode ms/token: past 200 {short:.1f}, past 600 {long:.1f}, ratio {long / short:.2f}")
    assert long / short < 3  # generous: a KV copy through numpy every step would not break this alone
