"""KV-cache compression in the runtime (issue 20): decoder_kv.onnx on ONNX Runtime gives the PyTorch path's greedy
tokens and KV bytes (eviction and spindlekv, one row and a left-padded batch, GQA), and bad input is one line
(run_trt.py's bad --kv-method / --kv-budget: tests/test_kv_compression.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, generate_from_batch
from covipal.kv_compression import KVConfig
from covipal_export import names
from covipal_export.export.exporter import ExportOptions, ExportResult, export_model
from covipal_export.export.quantize import QuantOptions
from covipal_export.manifest import load_manifest
from covipal_export.runtime import Pipeline
from covipal_export.runtime.backend import Backend
from covipal_export.runtime.compressed_kv import HostRotary
from covipal_export.runtime.reference import reference_from_manifest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "covipal" / "assets" / "easy-vqa-test-0.png")
NEW_TOKENS = 24
BUDGET = 8  # visual tokens


@pytest.fixture(scope="module")
def kv_exported(tmp_path_factory) -> ExportResult:
    """tiny-random-llava (2 layers, 4 query heads on 2 KV heads) with decoder_kv.onnx, verified."""
    out = tmp_path_factory.mktemp("kv-export") / "tiny-b8-kv"
    return export_model(ExportOptions(model="tiny-random-llava", budget=BUDGET, out=out, strategy="ppm",
                                      kv_variant=True))


@pytest.fixture(scope="module")
def kv_export(kv_exported) -> Path:
    return kv_exported.directory


@pytest.fixture(scope="module")
def pipe(kv_export) -> Pipeline:
    return Pipeline.from_dir(kv_export, backend="ort")


@pytest.fixture(scope="module")
def reference(kv_export):
    return reference_from_manifest(load_manifest(kv_export))


@pytest.mark.parametrize("kv", [KVConfig("eviction", 0.4), KVConfig("eviction", 10), KVConfig("spindlekv", 0.3),
                                KVConfig("spindlekv", 0.5)], ids=lambda kv: f"{kv.method}-{kv.budget}")
@pytest.mark.parametrize("rows", [[0], [1, 2]], ids=["one-row", "left-padded-two"])
def test_ort_gives_the_pytorch_paths_tokens_and_bytes(pipe, reference, images, questions, kv, rows):
    model, strategy = reference
    images, questions = [images[i] for i in rows], [questions[i] for i in rows]
    batch = pipe.processor(images, questions)
    if len(rows) > 1:
        assert not batch.attention_mask.all()  # left padding
    result = pipe.generate(images, questions, budget=BUDGET, max_new_tokens=NEW_TOKENS, kv=kv)
    want = generate_from_batch(model, batch, strategy=strategy, budget=BUDGET, sampling=SamplingConfig(NEW_TOKENS),
                               kv=kv)
    np.testing.assert_array_equal(result.sequences, want.sequences.numpy())
    assert result.kv_bytes == want.kv_bytes
    full = pipe.generate(images, questions, budget=BUDGET, max_new_tokens=NEW_TOKENS)
    assert result.kv_bytes < full.kv_bytes
    assert result.to_json()["kv_method"] == kv.method and result.to_json()["kv_budget"] == kv.budget


def test_compression_changes_the_answer_here(pipe, images, questions):
    # the parity above could not fail if the cache were never compressed: at 0.4, tiny-random-llava answers otherwise
    full = pipe.generate(images[1:3], questions[1:3], budget=BUDGET, max_new_tokens=NEW_TOKENS)
    evicted = pipe.generate(images[1:3], questions[1:3], budget=BUDGET, max_new_tokens=NEW_TOKENS,
                            kv=KVConfig("eviction", 0.4))
    assert not np.array_equal(full.sequences, evicted.sequences)


def test_full_cache_bytes_match_pytorch(pipe, reference, images, questions):
    model, strategy = reference
    batch = pipe.processor(images[:2], questions[:2])
    result = pipe.generate(images[:2], questions[:2], budget=BUDGET, max_new_tokens=NEW_TOKENS)
    want = generate_from_batch(model, batch, strategy=strategy, budget=BUDGET, sampling=SamplingConfig(NEW_TOKENS))
    assert result.kv_bytes == want.kv_bytes > 0


def test_torch_backend_runs_the_same_compression(kv_export, pipe, images, questions):
    kv = KVConfig("spindlekv", 0.3)
    mine = Pipeline.from_dir(kv_export, backend="torch").generate(images[1:3], questions[1:3], budget=BUDGET,
                                                                  max_new_tokens=12, kv=kv)
    theirs = pipe.generate(images[1:3], questions[1:3], budget=BUDGET, max_new_tokens=12, kv=kv)
    np.testing.assert_array_equal(mine.sequences, theirs.sequences)
    assert mine.kv_bytes == theirs.kv_bytes


def test_export_verification_checks_each_compressed_method(kv_exported):
    checks = {check.what: check.ok for check in kv_exported.report.checks if check.stage == "kv"}
    assert checks == {f"{what}, {method} 0.4": True for method in ("eviction", "spindlekv")
                      for what in ("greedy tokens", "KV bytes held")}


def test_the_manifest_describes_the_variant(kv_export, tiny):
    manifest = load_manifest(kv_export)
    variant = manifest.kv_variant
    config = tiny.text_config
    assert variant.graph.file == names.KV_DECODER_FILE and (kv_export / names.KV_DECODER_FILE).is_file()
    assert variant.methods == ["eviction", "spindlekv"] and variant.window == 16
    assert variant.num_attention_heads == config.num_attention_heads
    masks = [spec for spec in variant.graph.inputs if spec.name.startswith("past_mask.")]
    assert [spec.shape for spec in masks] == [[names.BATCH, config.num_attention_heads, names.past_dim(i)]
                                              for i in range(config.num_hidden_layers)]
    assert variant.graph.outputs[4].shape[2] == names.WINDOW  # window_query.0
    assert names.KV_DECODER_FILE in manifest.files


def test_host_rotary_is_the_models(pipe, tiny):
    positions = torch.tensor([[0, 5, 17, 300], [3, 4, 5, 6]])
    x = torch.zeros(1)
    ours, theirs = HostRotary(pipe.manifest.kv_variant)(x, positions), tiny.language_model.rotary_emb(x, positions)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_an_export_without_the_variant_refuses_in_one_line(tiny_export, images, questions):
    pipe = Pipeline.from_dir(tiny_export, backend="ort")
    assert pipe.manifest.kv_variant is None  # a manifest without the section still loads
    with pytest.raises(CovipalError, match=r"needs decoder_kv.onnx, which this export lacks: .*--kv-variant"):
        pipe.generate(images[0], questions[0], kv=KVConfig("eviction", 0.4), stream=True)


def test_other_backends_refuse_kv_compression_in_one_line():
    tensorrt = SimpleNamespace(name="tensorrt")  # TrtBackend keeps Backend.check_kv: it needs a GPU to run at all
    with pytest.raises(CovipalError, match="eviction runs on ONNX Runtime and PyTorch; the tensorrt backend does not"):
        Backend.check_kv(tensorrt, KVConfig("eviction", 0.4))
    Backend.check_kv(tensorrt, KVConfig())  # the full cache runs everywhere


def test_kv_variant_with_quant_is_refused():
    with pytest.raises(CovipalError, match="--kv-variant with --quant is not supported"):
        ExportOptions(model="tiny-random-llava", budget=8, kv_variant=True, quantization=QuantOptions("int8"))


def run_trt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_trt.py", IMAGE, "What is it?", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_run_trt_without_the_variant_is_one_line(tiny_export):
    result = run_trt("--engine-dir", str(tiny_export), "--backend", "ort", "--kv-method", "eviction")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--kv-variant" in lines[0], result.stderr


def test_run_trt_json_reports_kv_bytes(kv_export):
    records = {}
    for method in ("none", "eviction"):
        result = run_trt("--engine-dir", str(kv_export), "--backend", "ort", "--kv-method", method, "--kv-budget",
                         "0.25", "--max-new-tokens", "6", "--json")
        assert result.returncode == 0, result.stderr
        records[method] = json.loads(result.stdout)
    assert records["none"]["kv_budget"] is None and records["eviction"]["kv_budget"] == 0.25
    assert 0 < records["eviction"]["kv_bytes"] < records["none"]["kv_bytes"]
