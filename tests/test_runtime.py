"""The runtime on tiny-random-llava: Pipeline parity with PyTorch, budgets, streaming, backends, memory, run_trt.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import covipal_export
from covipal.budget import ALL
from covipal.cli import run as run_cli
from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, generate_from_batch
from covipal_export import names
from covipal_export.manifest import load_manifest
from covipal_export.runtime import Pipeline, selection
from covipal_export.runtime.cli import main
from covipal_export.runtime.export_dir import find_engine_dir
from covipal_export.runtime.reference import reference_from_manifest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "covipal" / "assets" / "easy-vqa-test-0.png")
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def export_dir(tiny_export) -> Path:
    return tiny_export


@pytest.fixture(scope="module")
def pipe(export_dir) -> Pipeline:
    return Pipeline.from_dir(export_dir, backend="ort")


@pytest.fixture(scope="module")
def ort_name(export_dir) -> str:
    """The ONNX Runtime backend this machine gives: CUDA where onnxruntime-gpu gets a GPU, else the CPU."""
    no_cuda = selection.ort_cuda_missing(export_dir, load_manifest(export_dir))
    return "onnxruntime-cpu" if no_cuda else "onnxruntime-cuda"


@pytest.fixture(scope="module")
def reference(export_dir):
    return reference_from_manifest(load_manifest(export_dir))


@pytest.fixture()
def copy_of(export_dir, tmp_path):
    """A writable copy of the export, to damage."""
    return Path(shutil.copytree(export_dir, tmp_path / "copy"))


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("budget", [64, 16, 6])  # full, 25 %, 10 % of N = 64
def test_ort_tokens_equal_pytorch_pruned_generate(pipe, reference, images, questions, budget, batch_size):
    model, strategy = reference
    images, questions = images[:batch_size], questions[:batch_size]
    result = pipe.generate(images, questions, budget=budget, max_new_tokens=NEW_TOKENS)
    want = generate_from_batch(model, pipe.processor(images, questions), strategy=strategy, budget=budget,
                               position_policy="keep", sampling=SamplingConfig(max_new_tokens=NEW_TOKENS))
    np.testing.assert_array_equal(result.sequences, want.sequences.numpy())
    assert result.answers == want.texts
    assert (result.tokens_kept, result.tokens_total) == (budget, 64)
    assert result.prefill_length == want.prefill_length


def test_torch_backend_gives_the_same_tokens(export_dir, pipe, images, questions):
    torch_pipe = Pipeline.from_dir(export_dir, backend="torch")
    assert torch_pipe.backend.name == "torch" and "registry" in torch_pipe.reason
    mine = torch_pipe.generate(images, questions, budget=16, max_new_tokens=8)
    theirs = pipe.generate(images, questions, budget=16, max_new_tokens=8)
    np.testing.assert_array_equal(mine.sequences, theirs.sequences)


def test_single_question_stats_and_default_budget(pipe, images, ort_name):
    result = pipe.generate(images[0], "What is on the table?", max_new_tokens=4)
    assert isinstance(result.answer, str) and result.answers == [result.answer]
    assert result.tokens_kept == 8 and result.tokens_total == 64  # the manifest's default budget
    assert result.backend == ort_name
    timings = result.timings_ms
    assert min(timings.vision, timings.prune, timings.prefill, timings.decode_per_token) > 0
    assert timings.ttft >= timings.vision + timings.prune + timings.prefill
    assert result.peak_rss_mb > 0
    report = result.to_json()
    assert set(report["timings_ms"]) >= {"vision", "prune", "prefill", "ttft", "decode_per_token"}
    json.dumps(report)


def test_one_budget_policy_in_the_pipeline(pipe, images):
    """"all" keeps every token, numpy integers are budgets, and above N is refused (never clamped)."""
    everything = pipe.generate(images[0], "What?", budget=ALL, max_new_tokens=4)
    assert everything.tokens_kept == 64 and everything.kept_index.tolist() == [list(range(64))]
    np.testing.assert_array_equal(everything.sequences, pipe.generate(images[0], "What?", budget=64,
                                                                      max_new_tokens=4).sequences)
    assert pipe.generate(images[0], "What?", budget=np.int64(5), max_new_tokens=2).tokens_kept == 5
    for budget, message in [(65, "budget 65 is larger than the 64 visual tokens of this export"),
                            (0, "budget must be a positive integer, got 0"),
                            (2.5, "budget must be a positive integer, got 2.5")]:
        with pytest.raises(CovipalError, match=message):
            pipe.generate(images[0], "What?", budget=budget, max_new_tokens=2)


def test_stream_yields_the_same_answer(pipe, images):
    whole = pipe.generate(images[1], "Describe the image.", max_new_tokens=12)
    stream = pipe.generate(images[1], "Describe the image.", max_new_tokens=12, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == whole.answer
    np.testing.assert_array_equal(stream.result.sequences, whole.sequences)
    with pytest.raises(CovipalError, match="one question at a time"):
        pipe.generate(images[:2], ["a?", "b?"], stream=True)


def test_sampling_is_seeded_like_pytorch(pipe, reference, images, questions):
    model, strategy = reference

    def sample(seed):
        return pipe.generate(images, questions, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed).sequences

    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1)
    want = generate_from_batch(model, pipe.processor(images, questions), strategy=strategy, budget=8,
                               sampling=sampling)
    np.testing.assert_array_equal(sample(1), want.sequences.numpy())
    assert not np.array_equal(sample(1), sample(2))


def test_kv_cache_stays_in_ort_values(pipe, images):
    backend, batch = pipe.backend, pipe.processor([images[0]], ["What?"])
    prompt = backend.prune(batch.input_ids, batch.attention_mask, backend.encode_images(batch.pixel_values), 8, "keep")
    _, cache = backend.prefill(prompt)  # the call's cache: the backend holds none
    for step in range(2):
        length = prompt.attention_mask.shape[1] + step + 1
        backend.step(cache, torch.tensor([42]), torch.ones(1, length, dtype=torch.long), torch.tensor([[length - 1]]))
    past = cache.values
    assert len(past) == 2 * pipe.manifest.decoder.num_layers
    assert all(isinstance(value, ort.OrtValue) for value in past)
    assert past[0].shape()[2] == pipe.generate(images[0], "What?", max_new_tokens=3).prefill_length + 2


def test_auto_says_which_backend_and_why(export_dir):
    auto = covipal_export.Pipeline.from_dir(export_dir)
    assert auto.backend.name.startswith("onnxruntime-")
    assert "TensorRT not used" in auto.reason and "ONNX Runtime on" in auto.reason


def test_a_cuda_provider_without_a_gpu_is_not_trusted(export_dir, monkeypatch):
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # what onnxruntime-gpu lists on a CPU-only box
    monkeypatch.setattr(selection.ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(selection, "cuda_device_count", lambda: 0)
    pipe = Pipeline.from_dir(export_dir, check_files=False)
    assert pipe.backend.name == "onnxruntime-cpu" and "no NVIDIA GPU is usable" in pipe.reason


def test_bad_directories(copy_of, tmp_path):
    with pytest.raises(CovipalError, match="engine directory not found"):
        Pipeline.from_dir(tmp_path / "nowhere")
    with pytest.raises(CovipalError, match="no manifest.json"):
        Pipeline.from_dir(tmp_path)
    (copy_of / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(CovipalError, match="sha256 differs: tokenizer/tokenizer.json"):
        Pipeline.from_dir(copy_of)


def test_backend_trt_refuses_in_one_line(export_dir):
    with pytest.raises(CovipalError, match="--backend trt is not available: ") as error:
        Pipeline.from_dir(export_dir, backend="trt")
    assert "\n" not in str(error.value)


def test_embedded_pipeline_does_not_grow_over_20_questions(export_dir):
    """A camera-app style script: one pipeline, 20 questions, RSS measured after a warm-up."""
    script = textwrap.dedent(f"""
        import numpy as np, psutil
        from covipal_export import Pipeline
        pipe = Pipeline.from_dir({str(export_dir)!r})
        rng = np.random.default_rng(0)
        frames = [(rng.random((48, 64, 3)) * 255).astype(np.uint8) for _ in range(4)]
        for frame in frames:
            pipe.generate(frame, "What is in front of the camera?", max_new_tokens=16)
        before = psutil.Process().memory_info().rss
        for i in range(20):
            pipe.generate(frames[i % 4], f"Question {{i}}: what is in front of the camera?", max_new_tokens=16,
                          budget=4 + i)
        print((psutil.Process().memory_info().rss - before) / 2**20)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    print(f"RSS growth over 20 questions: {growth_mb:.1f} MB")
    assert growth_mb < 30


# run_trt.py


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """run_trt.py in-process: exit status, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(list(args)))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def assert_one_line_error(capsys, message: str, *args: str) -> None:
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_run_trt_script_answers_with_a_one_line_summary(export_dir, ort_name):
    result = subprocess.run([sys.executable, "run_trt.py", IMAGE, "what is the red shape?", "--engine-dir",
                             str(export_dir), "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and len(result.stdout.splitlines()) == 1
    summary = result.stderr.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(ort_name) and "8/64 visual tokens kept" in summary[0]


def test_run_trt_text_and_json(capsys, export_dir, pipe, ort_name):
    want = pipe.generate(IMAGE, "what is the red shape?", budget=16, max_new_tokens=6).answer
    code, out, err = cli(capsys, IMAGE, "what is the red shape?", "--engine-dir", str(export_dir), "--budget", "16",
                         "--max-new-tokens", "6")
    assert code == 0 and out == want + "\n"
    assert ort_name in err and "16/64 visual tokens kept" in err and "TTFT" in err and "tokens/s" in err
    code, out, _ = cli(capsys, IMAGE, "what is the red shape?", "--engine-dir", str(export_dir), "--json",
                       "--max-new-tokens", "6", "--budget", "16")
    report = json.loads(out)
    assert code == 0 and report["answer"] == want and report["backend"] == ort_name
    assert (report["tokens_kept"], report["tokens_total"]) == (16, 64)
    assert set(report["timings_ms"]) >= {"vision", "prune", "prefill", "ttft", "decode_per_token"}


def test_run_trt_compares_with_unpruned(capsys, export_dir):
    engine = ("--engine-dir", str(export_dir), "--max-new-tokens", "4")
    code, out, err = cli(capsys, IMAGE, "what is the red shape?", *engine, "--compare-unpruned")
    saved = err.strip().splitlines()[-1]
    assert code == 0 and saved.startswith("pruning kept 8 of 64 visual tokens: prefill ") and "ms unpruned (" in saved
    code, out, _ = cli(capsys, IMAGE, "what is the red shape?", *engine, "--json", "--compare-unpruned")
    report = json.loads(out)["compare_unpruned"]
    assert code == 0 and (report["pruned"]["tokens_kept"], report["unpruned"]["tokens_kept"]) == (8, 64)
    code, out, _ = cli(capsys, IMAGE, "what is the red shape?", *engine, "--json", "--budget", "all")
    assert code == 0 and json.loads(out)["tokens_kept"] == 64


def test_run_trt_bad_input(capsys, export_dir, tmp_path):
    engine = ("--engine-dir", str(export_dir))
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, "JPEG")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    assert_one_line_error(capsys, "image not found: /nonexistent.png", "/nonexistent.png", "What?", *engine)
    assert_one_line_error(capsys, f"cannot read image {not_image}", str(not_image), "What?", *engine)
    assert_one_line_error(capsys, f"cannot read image {corrupt}", str(corrupt), "What?", *engine)
    assert_one_line_error(capsys, "the question is empty", IMAGE, "  ", *engine)
    assert_one_line_error(capsys, "the question is too long", IMAGE, "why " * 600, *engine)
    assert_one_line_error(capsys, "--backend trt is not available", IMAGE, "What?", "--backend", "trt", *engine)
    assert_one_line_error(capsys, "expected a positive integer", IMAGE, "What?", "--budget", "0", *engine)
    assert_one_line_error(capsys, "budget 65 is larger than the 64 visual tokens of this export", IMAGE, "What?",
                          "--budget", "65", *engine)


def test_run_trt_bad_engine_directories(capsys, copy_of, tmp_path):
    assert_one_line_error(capsys, "engine directory not found", IMAGE, "What?", "--engine-dir", str(tmp_path / "no"))
    assert_one_line_error(capsys, "no manifest.json", IMAGE, "What?", "--engine-dir", str(tmp_path))
    manifest = json.loads((copy_of / names.MANIFEST_FILE).read_text())
    (copy_of / names.MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 2}))
    assert_one_line_error(capsys, "format_version 2 is not supported", IMAGE, "What?", "--engine-dir", str(copy_of))
    (copy_of / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    (copy_of / "embed.onnx").write_bytes(b"not a graph")
    assert_one_line_error(capsys, "sha256 differs: embed.onnx", IMAGE, "What?", "--engine-dir", str(copy_of))


def test_run_trt_finds_the_engine_directory(tmp_path, capsys):
    with pytest.raises(CovipalError, match="no export directory"):
        find_engine_dir(tmp_path)
    for age, name in enumerate(("new", "old")):
        (tmp_path / name).mkdir()
        (tmp_path / name / names.MANIFEST_FILE).write_text("{}")
        os.utime(tmp_path / name / names.MANIFEST_FILE, (1e9 - age, 1e9 - age))
    assert find_engine_dir(tmp_path) == tmp_path / "new"
    assert "using the newest of 2 exports" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "old")
    assert find_engine_dir(tmp_path) == tmp_path / "new" and capsys.readouterr().err == ""
