"""The TopK-gather plugin: its kernel against covipal.selection and ppm.onnx, the swapped ONNX, the plugin's
shape/type/field logic, the refusal under TensorRT-RTX, and (full TensorRT + a GPU only) the engine it builds.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from covipal.errors import CovipalError
from covipal.selection import gather_tokens, keep_topk_in_order
from covipal_export import names
from covipal_export.build.engines import check_gather
from covipal_export.build.plugin_graph import swap_topk_gather, write_plugin_graph
from covipal_export.export.graphs import graph_specs, shape_ranges
from covipal_export.export.onnx_export import export_graph
from covipal_export.export.pruning_choice import choose_pruning
from covipal_export.plugin import spec
from covipal_export.plugin.kernel import kept_count, topk_gather, topk_gather_into
from covipal_export.runtime.reference import load_reference_model

ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
BINDINGS = next((m for m in ("tensorrt", "tensorrt_rtx") if importlib.util.find_spec(m)), None)
TOPK_OPS = {"TopK", "GatherElements", "Clip"}  # the native keep-top-k's signature ops


def reference(scores: torch.Tensor, tokens: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    kept_index = keep_topk_in_order(scores, min(budget, scores.shape[1]))
    return gather_tokens(tokens, kept_index), kept_index


def score_cases(batch: int, n: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Distinct random scores, heavy ties (3 levels), and all equal."""
    return [torch.randn(batch, n, generator=generator),
            torch.randint(0, 3, (batch, n), generator=generator).float(),
            torch.zeros(batch, n)]


# --- kernel -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_kernel_equals_keep_topk_in_order_and_gather(dtype, batch):
    generator = torch.Generator().manual_seed(batch)
    n, d = 13, 5
    tokens = torch.randn(batch, n, d, generator=generator).to(dtype)
    for scores in score_cases(batch, n, generator):
        for budget in [*range(1, n + 1), n + 1, 4 * n]:
            kept_tokens, kept_index = topk_gather(scores, tokens, budget)
            want_tokens, want_index = reference(scores, tokens, budget)
            assert kept_index.dtype == torch.int64 and kept_tokens.dtype == dtype
            assert kept_index.shape == (batch, min(budget, n)) and kept_tokens.shape == (batch, min(budget, n), d)
            assert torch.equal(kept_index, want_index) and torch.equal(kept_tokens, want_tokens)


def test_kernel_ties_go_to_the_lower_index_in_ascending_order():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0]])
    tokens = torch.arange(6.0).reshape(1, 6, 1)
    kept_tokens, kept_index = topk_gather(scores, tokens, 4)
    assert kept_index.tolist() == [[0, 1, 2, 4]] and kept_tokens.flatten().tolist() == [0.0, 1.0, 2.0, 4.0]


def test_kernel_clamps_the_budget_like_ppm_onnx():
    assert [kept_count(b, 10) for b in (-3, 0, 1, 7, 10, 11, 500)] == [1, 1, 1, 7, 10, 10, 10]
    scores, tokens = torch.randn(2, 10), torch.randn(2, 10, 3)
    for budget, k in [(0, 1), (10, 10), (99, 10)]:
        kept_tokens, kept_index = topk_gather(scores, tokens, budget)
        assert torch.equal(kept_index, keep_topk_in_order(scores, k)) and kept_tokens.shape == (2, k, 3)


def test_kernel_writes_into_given_outputs():
    scores, tokens = torch.randn(2, 9), torch.randn(2, 9, 4, dtype=torch.float16)
    kept_tokens, kept_index = torch.full((2, 3, 4), 7.0, dtype=torch.float16), torch.full((2, 3), -1)
    topk_gather_into(scores, tokens, kept_tokens, kept_index)
    want_tokens, want_index = reference(scores, tokens, 3)
    assert torch.equal(kept_index, want_index) and torch.equal(kept_tokens, want_tokens)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU to run the kernel on the device")
def test_kernel_on_cuda_equals_the_cpu():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 64, 8, generator=generator).half()
    for scores in score_cases(3, 64, generator):
        for budget in (1, 17, 64, 100):
            on_gpu = topk_gather(scores.cuda(), tokens.cuda(), budget)
            on_cpu = topk_gather(scores, tokens, budget)
            assert all(torch.equal(g.cpu(), c) for g, c in zip(on_gpu, on_cpu))


# --- ONNX: the native graph, the swap ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["fp32", "fp16"])
def ppm_onnx(request, tmp_path_factory) -> Path:
    """ppm.onnx of tiny-random-llava (its random PPM) as export.py writes it."""
    model = load_reference_model("tiny-random-llava", dtype=request.param, random_weights=True)
    strategy, _ = choose_pruning(model, "ppm", None, 8, "keep", 0)
    spec_ = next(s for s in graph_specs(model, strategy, shape_ranges(model, 4), 8, True) if s.stage == names.PRUNE)
    directory = tmp_path_factory.mktemp(f"ppm-{request.param}")
    export_graph(spec_, directory, 20)
    return directory / names.GRAPH_FILES[names.PRUNE]


def test_kernel_equals_the_native_graph(ppm_onnx):
    """The op replaces ppm.onnx's TopK/Gather subgraph: same kept tokens and indices from the graph's own scores."""
    session = ort.InferenceSession(str(ppm_onnx), providers=["CPUExecutionProvider"])
    dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    rng = np.random.default_rng(0)
    n, d = session.get_inputs()[0].shape[1:]
    feeds = {names.VISUAL_TOKENS: rng.standard_normal((2, n, d)).astype(dtype),
             names.TEXT_EMBEDS: rng.standard_normal((2, 5, d)).astype(dtype),
             names.TEXT_MASK: np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)}
    for budget in (0, 1, 8, n, n + 5):
        kept_tokens, kept_index, scores = session.run(None, {**feeds, names.BUDGET: np.array(budget, np.int64)})
        ours = topk_gather(torch.from_numpy(scores), torch.from_numpy(feeds[names.VISUAL_TOKENS]), budget)
        assert np.array_equal(ours[1].numpy(), kept_index) and np.array_equal(ours[0].numpy(), kept_tokens)


def test_swap_leaves_one_topk_gather_node(ppm_onnx):
    original = onnx.load(str(ppm_onnx))
    swapped = swap_topk_gather(original)
    onnx.checker.check_model(swapped, full_check=True)
    custom = [node for node in swapped.graph.node if node.domain == spec.DOMAIN]
    assert len(custom) == 1
    node = custom[0]
    assert node.op_type == spec.OP_TYPE == "TopKGather"
    assert list(node.input) == [names.SCORES, names.VISUAL_TOKENS, names.BUDGET]
    assert list(node.output) == [names.KEPT_TOKENS, names.KEPT_INDEX]
    num_tokens = original.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"min_kept": 1, "max_kept": num_tokens, spec.SHAPE_INPUTS_ATTRIBUTE: [spec.BUDGET_INPUT]}
    assert {(o.domain, o.version) for o in swapped.opset_import} >= {(spec.DOMAIN, spec.DOMAIN_VERSION)}
    assert not TOPK_OPS & {n.op_type for n in swapped.graph.node}
    assert TOPK_OPS <= {n.op_type for n in original.graph.node}
    # everything that computes the scores is untouched
    kept = {n.name for n in swapped.graph.node} - {node.name}
    assert kept <= {n.name for n in original.graph.node} and len(kept) < len(original.graph.node)


def test_swap_keeps_the_graph_interface_and_shape_inference(ppm_onnx):
    original = onnx.load(str(ppm_onnx))
    inferred = onnx.shape_inference.infer_shapes(swap_topk_gather(original), strict_mode=True)

    def interface(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    assert interface(inferred.graph.input) == interface(original.graph.input)
    assert interface(inferred.graph.output) == interface(original.graph.output)
    outputs = {name: (dtype, dims) for name, dtype, dims in interface(inferred.graph.output)}
    tokens_type = original.graph.input[0].type.tensor_type.elem_type
    assert outputs[names.KEPT_TOKENS][0] == tokens_type and len(outputs[names.KEPT_TOKENS][1]) == 3
    assert outputs[names.KEPT_INDEX] == (onnx.TensorProto.INT64, [names.BATCH, names.KEPT])


def test_swap_refuses_a_graph_without_topk(ppm_onnx):
    swapped = swap_topk_gather(onnx.load(str(ppm_onnx)))
    with pytest.raises(CovipalError, match="has no TopK between the scores and the kept tokens"):
        swap_topk_gather(swapped)


def test_plugin_graph_is_written_beside_and_the_source_untouched(ppm_onnx, tmp_path):
    before = ppm_onnx.read_bytes()
    path = write_plugin_graph(ppm_onnx, tmp_path)
    assert path == tmp_path / "ppm.plugin.onnx" and ppm_onnx.read_bytes() == before
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count(spec.OP_TYPE) == 1


# --- the plugin's shape, type and field logic -------------------------------------------------------------------

def test_fields_round_trip_and_validate():
    fields = spec.TopKGatherFields(min_kept=1, max_kept=576)
    arrays = fields.to_arrays()
    assert {k: (a.dtype, a.tolist()) for k, a in arrays.items()} == {"min_kept": (np.int32, [1]),
                                                                    "max_kept": (np.int32, [576])}
    assert spec.TopKGatherFields.from_arrays(arrays) == fields
    with pytest.raises(CovipalError, match="plugin fields lack max_kept"):
        spec.TopKGatherFields.from_arrays({"min_kept": arrays["min_kept"]})
    with pytest.raises(CovipalError, match="needs 1 <= min_kept <= max_kept, got 0, 4"):
        spec.TopKGatherFields(0, 4)


@pytest.mark.parametrize("budget, kept", [(-2, 1), (0, 1), (1, 1), (100, 100), (576, 576), (577, 576), (10**6, 576)])
def test_output_shapes_clamp_the_budget(budget, kept):
    fields = spec.TopKGatherFields(1, 576)
    shapes = spec.output_shapes([3, 576], [3, 576, 4096], budget, fields, spec.IntOps())
    assert shapes == ([3, kept, 4096], [3, kept])


def test_output_shapes_and_types_rules():
    with pytest.raises(CovipalError, match="takes scores \\[B, N\\] and tokens \\[B, N, D\\], got ranks 3 and 3"):
        spec.output_shapes([1, 2, 3], [1, 2, 3], 1, spec.TopKGatherFields(1, 2), spec.IntOps())
    assert spec.output_types(["FLOAT", "HALF"]) == ["HALF", "INT64"]
    assert spec.output_types(["FLOAT", "FLOAT"]) == ["FLOAT", "INT64"]
    io = ["FLOAT", "HALF", "HALF", "INT64"]
    assert [spec.supports_types(pos, io) for pos in range(4)] == [True] * 4
    assert not spec.supports_types(2, ["FLOAT", "HALF", "FLOAT"])  # kept_tokens must follow tokens
    assert not spec.supports_types(3, ["FLOAT", "FLOAT", "FLOAT", "INT32"])
    assert not spec.supports_types(1, ["FLOAT", "BF16"]) and not spec.supports_types(0, ["INT8"])


def test_runtime_shape_check():
    fields = spec.TopKGatherFields(1, 64)
    spec.check_shapes([2, 64], [2, 64, 8], fields)
    with pytest.raises(CovipalError, match="disagree on \\[B, N\\]"):
        spec.check_shapes([2, 64], [2, 63, 8], fields)
    with pytest.raises(CovipalError, match="max_kept 64 exceeds the 32 tokens"):
        spec.check_shapes([2, 32], [2, 32, 8], fields)


@pytest.mark.skipif(BINDINGS is None, reason="needs TensorRT's Python bindings (tensorrt or tensorrt_rtx) to build "
                                             "the plugin classes")
def test_plugin_classes_serialize_clone_and_negotiate_types():
    """The plugin's Python methods on real binding types; no network, so TensorRT-RTX's bindings serve too."""
    trt = importlib.import_module(BINDINGS)
    from covipal_export.plugin.trt_plugin import plugin_classes

    plugin_class, creator_class = plugin_classes(trt)
    creator = creator_class()
    assert (creator.name, creator.plugin_version) == ("TopKGather", "1")
    assert [f.name for f in creator.field_names] == ["min_kept", "max_kept"]
    plugin = plugin_class(spec.TopKGatherFields(1, 196))
    restored = creator.create_plugin("ppm", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert restored.fields == plugin.fields and restored.num_outputs == 2 and restored.plugin_name == "TopKGather"
    clone = plugin.clone()
    assert clone is not plugin and clone.fields == plugin.fields
    assert plugin.get_capability_interface(trt.PluginCapabilityType.RUNTIME) is plugin
    assert plugin.get_output_data_types([trt.DataType.FLOAT, trt.DataType.HALF]) == [trt.DataType.HALF,
                                                                                      trt.DataType.INT64]

    def descs(*dtypes, fmt=trt.TensorFormat.LINEAR):
        out = []
        for dtype in dtypes:
            desc = trt.DynamicPluginTensorDesc()
            inner = desc.desc
            inner.type, inner.format = dtype, fmt
            desc.desc = inner
            out.append(desc)
        return out

    io = descs(trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.HALF, trt.DataType.INT64)
    assert [plugin.supports_format_combination(pos, io, 2) for pos in range(4)] == [True] * 4
    assert not plugin.supports_format_combination(3, descs(*[trt.DataType.FLOAT] * 3, trt.DataType.INT32), 2)
    assert not plugin.supports_format_combination(0, descs(trt.DataType.FLOAT, fmt=trt.TensorFormat.HWC8), 2)


# --- refusals ---------------------------------------------------------------------------------------------------

def test_check_gather_refuses_the_plugin_only_under_tensorrt_rtx():
    with pytest.raises(CovipalError, match="^TensorRT-RTX cannot take custom plugins"):
        check_gather("plugin", types.ModuleType("tensorrt_rtx"))
    check_gather("plugin", types.ModuleType("tensorrt"))
    check_gather("native", types.ModuleType("tensorrt_rtx"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="needs TensorRT-RTX (the trt-rtx extra)")
def test_register_plugin_refuses_tensorrt_rtx():
    from covipal_export.plugin.trt_plugin import register_plugin

    with pytest.raises(CovipalError, match="TensorRT-RTX cannot take custom plugins"):
        register_plugin(importlib.import_module("tensorrt_rtx"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="needs TensorRT-RTX (the trt-rtx extra)")
def test_cli_refuses_the_plugin_with_tensorrt_rtx(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, "export.py", "--model", "tiny-random-llava", "--budget", "8", "--out",
                             str(out), "--trt", "--gather", "plugin", "--module", "tensorrt_rtx"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT-RTX cannot take custom plugins")
    assert not out.exists()


# --- full TensorRT on a GPU -------------------------------------------------------------------------------------

@pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason="needs full TensorRT (module `tensorrt`) and a CUDA GPU to "
                                                       "build and run the plugin engine")
def test_plugin_engine_matches_the_kernel_and_the_native_graph(tmp_path):
    from covipal_export.build.engines import build_engines
    from covipal_export.engine_info import read_engine_info
    from covipal_export.export.exporter import ExportOptions, export_model
    from covipal_export.names import ENGINE_DIR
    from covipal_export.plugin.trt_plugin import register_plugin

    trt = importlib.import_module("tensorrt")
    out = tmp_path / "tiny"
    export_model(ExportOptions(model="tiny-random-llava", budget=8, out=out, verify=False))
    infos = {info.stage: info for info in build_engines(out, module="tensorrt", gather="plugin")}
    assert infos[names.PRUNE].gather == "plugin" and infos[names.DECODER].gather == "native"
    assert read_engine_info(out, names.PRUNE).gather == "plugin" and (out / ENGINE_DIR / "ppm.plugin.onnx").is_file()

    register_plugin(trt)  # before deserializing: the engine holds the Python plugin
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((out / ENGINE_DIR / f"{names.PRUNE}.engine").read_bytes())
    context = engine.create_execution_context()
    native = ort.InferenceSession(str(out / "ppm.onnx"), providers=["CPUExecutionProvider"])
    n, d = native.get_inputs()[0].shape[1:]
    generator = torch.Generator().manual_seed(0)
    feeds = {names.VISUAL_TOKENS: torch.randn(2, n, d, generator=generator),
             names.TEXT_EMBEDS: torch.randn(2, 5, d, generator=generator),
             names.TEXT_MASK: torch.ones(2, 5, dtype=torch.int64)}
    torch_dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                    trt.DataType.INT64: torch.int64}
    for budget in (1, 8, n):
        device = {name: t.cuda() for name, t in feeds.items()}
        for name, tensor in device.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        budget_host = np.array(budget, dtype=np.int64)  # a shape input: host memory
        context.set_tensor_address(names.BUDGET, budget_host.ctypes.data)
        results = {}
        for name in (names.KEPT_TOKENS, names.KEPT_INDEX, names.SCORES):
            results[name] = torch.empty(tuple(context.get_tensor_shape(name)),
                                        dtype=torch_dtypes[engine.get_tensor_dtype(name)], device="cuda")
            context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        results = {name: t.cpu() for name, t in results.items()}
        kept_tokens, kept_index = topk_gather(results[names.SCORES], feeds[names.VISUAL_TOKENS], budget)
        assert torch.equal(results[names.KEPT_INDEX], kept_index)
        assert torch.equal(results[names.KEPT_TOKENS], kept_tokens)
        ort_index = native.run([names.KEPT_INDEX], {**{k: v.numpy() for k, v in feeds.items()},
                                                   names.BUDGET: budget_host})[0]
        assert results[names.KEPT_INDEX].shape == ort_index.shape == (2, budget)
