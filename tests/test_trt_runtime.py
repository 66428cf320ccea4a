"""The TensorRT backend: which backend is picked and why, the one-line refusals, and engine runs against ONNX Runtime.

The engines come from a tiny-random-llava export. Without a GPU, TensorRT-RTX builds them ahead of time, so the
selection and refusal paths run on any machine with a TensorRT module; running the engines needs an NVIDIA GPU and
a CUDA build of torch, and those tests skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from covipal.cli import run as run_cli
from covipal.errors import CovipalError
from covipal_export.build.engines import build_engines
from covipal_export.engine_info import import_tensorrt
from covipal_export.names import ENGINE_DIR
from covipal_export.runtime import Pipeline, selection, trt_backend
from covipal_export.runtime.cli import main as run_trt_main

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "covipal" / "assets" / "easy-vqa-test-0.png")
HAS_GPU = selection.cuda_device_count() > 0 and torch.cuda.is_available()

pytestmark = pytest.mark.skipif(
    all(importlib.util.find_spec(m) is None for m in ("tensorrt", "tensorrt_rtx")),
    reason="needs a TensorRT module to build engines (tensorrt, or tensorrt_rtx, which builds without a GPU)")
gpu = pytest.mark.skipif(not HAS_GPU, reason="running TensorRT engines needs an NVIDIA GPU and a CUDA build of torch")
no_gpu = pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without a GPU")


@pytest.fixture(scope="module")
def export_dir(tiny_export) -> Path:
    return tiny_export


@pytest.fixture(scope="module")
def engine_dir(export_dir, tmp_path_factory) -> Path:
    """A copy of the export with engines: for this GPU where there is one, else for TensorRT-RTX's default target."""
    directory = Path(shutil.copytree(export_dir, tmp_path_factory.mktemp("trt-engines") / export_dir.name))
    capability = None
    if HAS_GPU and import_tensorrt().__name__ == "tensorrt_rtx":  # full TensorRT builds for the GPU it runs on
        capability = "{}.{}".format(*torch.cuda.get_device_capability())
    try:
        build_engines(directory, compute_capability=capability)
    except CovipalError as error:  # e.g. TensorRT-RTX on an SM90 GPU, which it cannot target
        pytest.skip(f"cannot build engines for this machine: {error}")
    return directory


def one_line_error(capsys, *args: str) -> str:
    """run_trt.py in-process, expected to fail: its one stderr line (after checking the exit status)."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: run_trt_main(list(args)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_without_engines_trt_names_the_build_command(export_dir, capsys):
    build = f"no TensorRT engines in {export_dir / ENGINE_DIR} (build them with `python -m covipal_export.build " \
            f"{export_dir}`)"
    line = one_line_error(capsys, IMAGE, "What?", "--engine-dir", str(export_dir), "--backend", "trt")
    assert line == f"error: --backend trt is not available: {build}; use --backend ort"
    auto = Pipeline.from_dir(export_dir)
    assert auto.backend.name.startswith("onnxruntime-") and auto.reason.startswith(f"TensorRT not used: {build}; ")


@no_gpu
def test_engines_without_a_gpu_name_the_gpu(engine_dir, capsys):
    line = one_line_error(capsys, IMAGE, "What?", "--engine-dir", str(engine_dir), "--backend", "trt")
    assert line == ("error: --backend trt is not available: no NVIDIA GPU is usable (TensorRT engines run on a GPU "
                    "only); use --backend ort")
    auto = Pipeline.from_dir(engine_dir)  # the engines in trt/ do not upset the manifest's file check
    assert auto.backend.name == "onnxruntime-cpu"
    assert auto.reason.startswith("TensorRT not used: no NVIDIA GPU is usable (TensorRT engines run on a GPU only); "
                                  "ONNX Runtime on CPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal with a torch build that has no CUDA")
def test_a_gpu_without_cuda_torch_names_torch(engine_dir, monkeypatch):
    monkeypatch.setattr(selection, "cuda_device_count", lambda: 1)
    with pytest.raises(CovipalError) as error:
        Pipeline.from_dir(engine_dir, backend="trt")
    assert str(error.value) == (f"--backend trt is not available: torch {torch.__version__} cannot use the GPU (the "
                                f"engines' buffers are torch CUDA tensors; install a CUDA build of torch); use "
                                f"--backend ort")


def test_an_engine_from_another_tensorrt_is_refused_in_one_line(engine_dir, tmp_path, monkeypatch):
    directory = Path(shutil.copytree(engine_dir, tmp_path / "old"))
    metadata = directory / ENGINE_DIR / "vision.engine.json"
    record = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**record, "version": "0.9"}))
    if not HAS_GPU:  # the guard runs before anything touches a GPU: pretend there is one, of the engines' target
        monkeypatch.setattr(selection, "cuda_device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(trt_backend, "gpu_target", lambda trt: record["target"])
    module = record["module"]
    with pytest.raises(CovipalError, match=rf"^vision\.engine was built by {module} 0\.9, this is {module} [0-9.]+: "
                                           rf"rebuild with `python -m covipal_export\.build {directory}`$"):
        Pipeline.from_dir(directory, backend="trt")
    auto = Pipeline.from_dir(directory)
    assert auto.backend.name.startswith("onnxruntime-")
    assert auto.reason.startswith(f"TensorRT not used: vision.engine was built by {module} 0.9")


@pytest.fixture(scope="module")
def trt_pipe(engine_dir) -> Pipeline:
    return Pipeline.from_dir(engine_dir, backend="trt")


@pytest.fixture(scope="module")
def ort_pipe(engine_dir) -> Pipeline:
    return Pipeline.from_dir(engine_dir, backend="ort")


@gpu
def test_auto_picks_tensorrt_and_says_why(engine_dir, trt_pipe):
    auto = Pipeline.from_dir(engine_dir)
    assert auto.backend.name == trt_pipe.backend.name and auto.backend.name in ("tensorrt", "tensorrt-rtx")
    assert auto.reason.startswith("engines, TensorRT and a GPU are present; ")


@gpu
@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("budget", [64, 16, 6])  # full, 25 %, 10 % of N = 64
def test_trt_tokens_equal_ort_tokens(trt_pipe, ort_pipe, images, questions, budget, size):
    want = ort_pipe.generate(images[:size], questions[:size], budget=budget, max_new_tokens=16)
    got = trt_pipe.generate(images[:size], questions[:size], budget=budget, max_new_tokens=16)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    assert got.answers == want.answers
    assert (got.tokens_kept, got.prefill_length) == (want.tokens_kept, want.prefill_length)
    assert got.tokens_kept == budget


@gpu
def test_prefill_logits_match_ort(trt_pipe, ort_pipe, images, questions):
    got = trt_pipe.first_token_logits(images, questions, budget=16)
    want = ort_pipe.first_token_logits(images, questions, budget=16)
    assert got.shape == want.shape == (3, trt_pipe.manifest.model.vocab_size) and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@gpu
def test_kv_cache_stays_on_the_gpu(trt_pipe, images):
    result = trt_pipe.generate(images[0], "What?", max_new_tokens=3)
    past = trt_pipe.backend.past
    assert len(past) == 2 * trt_pipe.manifest.decoder.num_layers
    assert all(isinstance(t, torch.Tensor) and t.is_cuda for t in past)
    assert past[0].shape[2] == result.prefill_length + result.sequences.shape[1] - 1
