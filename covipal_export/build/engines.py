"""TensorRT engines for an export directory: one engine per graph, profiles from the manifest.

    manifest.json --shape ranges--> one optimization profile per graph
                                    (batch, text, sequence, past, total; `budget` as a shape input)
    <stage>.onnx  --parser + strongly typed network--> trt/<stage>.engine + trt/<stage>.engine.json

The module is chosen at run time: `tensorrt` (full TensorRT: x86 from NVIDIA's index, JetPack on
Jetson) where it imports, else `tensorrt_rtx` (TensorRT-RTX from PyPI), which builds ahead of time
for a chosen compute capability even without a GPU. Networks are strongly typed, so fp16 engines
come from fp16 ONNX and fp32 engines from fp32 ONNX. A timing cache is reused across builds.
The `.engine.json` beside each engine records what built it (covipal_export.engine_info, which the
runtime checks before loading an engine). With `--gather plugin` (full TensorRT only) the PPM engine
is built from trt/ppm.plugin.onnx: ppm.onnx with its keep-top-k swapped for the TopKGather plugin
(plugin_graph.py; the plugin itself is covipal_export/plugin). The ONNX Runtime path and the manifest
keep the standard graph.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.build.plugin_graph import write_plugin_graph
from covipal_export.engine_info import (
    EngineInfo,
    Profile,
    TensorInfo,
    gpu_target,
    import_tensorrt,
    make_logger,
    write_engine_info,
)
from covipal_export.manifest import Manifest, load_manifest, sha256_of
from covipal_export.memory import available_bytes, gib, peak_rss_bytes
from covipal_export.plugin.trt_plugin import register_plugin

TIMING_CACHE = "timing.cache"  # beside the export directories (engines/timing.cache), shared by their builds
RTX_DEFAULT_CAPABILITY = "8.9"  # TensorRT-RTX targets SM75-SM121 (no SM90, no Jetson)


_NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                 "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


def network_io(network) -> tuple[list[TensorInfo], list[TensorInfo]]:
    def info(tensor) -> TensorInfo:
        return TensorInfo(tensor.name, _NUMPY_DTYPES.get(tensor.dtype.name, tensor.dtype.name.lower()),
                          list(tensor.shape))

    return ([info(network.get_input(i)) for i in range(network.num_inputs)],
            [info(network.get_output(i)) for i in range(network.num_outputs)])


def _dims_match(found: list[int], expected: list[int | str], output: bool) -> bool:
    """Symbolic dims must be dynamic (-1), fixed dims equal; an output's fixed dim may also be -1
    (TensorRT's shape inference does not fold every slice, e.g. last-position logits)."""
    return len(found) == len(expected) and all(
        f == -1 if isinstance(e, str) else (f == e or (output and f == -1)) for f, e in zip(found, expected))


def check_network(manifest: Manifest, stage: str, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> None:
    """The parsed network's I/O names, dtypes and shapes agree with the manifest (see `_dims_match`)."""
    graph = manifest.graphs[stage]
    for kind, ours, theirs in (("input", inputs, graph.inputs), ("output", outputs, graph.outputs)):
        agree = [t.name for t in ours] == [t.name for t in theirs] and all(
            o.dtype == t.dtype and _dims_match(o.shape, t.shape, kind == "output") for o, t in zip(ours, theirs))
        if not agree:
            found = [(t.name, t.dtype, t.shape) for t in ours]
            expected = [(t.name, t.dtype, t.shape) for t in theirs]
            raise CovipalError(f"{graph.file}: TensorRT sees {kind}s {found}, the manifest says {expected}")


def dimension_ranges(manifest: Manifest) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic dimension, from the manifest's shape ranges."""
    shapes, budget = manifest.shapes, manifest.pruning.default_budget
    prompt = min(shapes.max_context, shapes.visual_tokens + 64)  # a typical prompt: image + ~64 text tokens
    return {
        names.BATCH: (1, 1, shapes.max_batch),
        names.TEXT: (1, min(64, shapes.max_text), shapes.max_text),
        names.SEQUENCE: (1, prompt, shapes.max_context),
        names.PAST: (0, prompt - shapes.visual_tokens + budget, shapes.max_context - 1),
        names.TOTAL: (1, prompt, shapes.max_context),
    }


def graph_profiles(manifest: Manifest, stage: str) -> list[Profile]:
    """The optimization profile of one graph: every input's range, `budget` as a shape input."""
    ranges = dimension_ranges(manifest)
    profiles = []
    for spec in manifest.graphs[stage].inputs:
        if spec.name == names.BUDGET:
            profiles.append(Profile(spec.name, [1], [manifest.pruning.default_budget],
                                    [manifest.shapes.visual_tokens], shape_input=True))
            continue
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in spec.shape]
        profiles.append(Profile(spec.name, [d[0] for d in dims], [d[1] for d in dims], [d[2] for d in dims]))
    return profiles


def build_target(trt: ModuleType, compute_capability: str | None) -> str:
    """The build target, checked before anything is built: "sm89" (TensorRT-RTX) or the local GPU (TensorRT)."""
    if trt.__name__ == "tensorrt_rtx":
        capability = compute_capability or RTX_DEFAULT_CAPABILITY
        member = "SM" + capability.replace(".", "")
        if not hasattr(trt.ComputeCapability, member):
            choices = sorted(m[2:-1] + "." + m[-1] for m in dir(trt.ComputeCapability) if m.startswith("SM"))
            raise CovipalError(f"TensorRT-RTX cannot target compute capability {capability}; choose one of: "
                               f"{', '.join(choices)}")
        return member.lower()
    if compute_capability:
        raise CovipalError("--compute-capability is for TensorRT-RTX; full TensorRT builds for the GPU it runs on")
    import torch

    if not torch.cuda.is_available():
        raise CovipalError("full TensorRT builds on a GPU and none is visible; use TensorRT-RTX to build ahead of time")
    return gpu_target(trt)


def build_engine(trt: ModuleType, manifest: Manifest, directory: Path, stage: str, engine_dir: Path, *,
                 workspace_mb: int | None, target: str, timing_cache: Path, gather: str = "native") -> EngineInfo:
    """Parse one graph, build its engine with the manifest's profile, write engine + metadata to engine_dir.

    With gather "plugin", the PPM graph parsed is its TopKGather copy, written to engine_dir beside the engine.
    A quantized decoder is built from its QDQ form (`Manifest.trt_graph_file`), whose weights are decoder.onnx's.
    """
    start = time.perf_counter()
    onnx_path = Path(directory) / manifest.trt_graph_file(stage)  # a quantized decoder: its QDQ form
    gather = gather if stage == names.PRUNE else "native"
    parsed = onnx_path
    if gather == "plugin":
        register_plugin(trt)  # the parser creates the plugin from the registry
        parsed = write_plugin_graph(onnx_path, engine_dir)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parsed)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CovipalError(f"TensorRT cannot parse {parsed.name}: {errors}{_why(manifest, stage, errors)}")
    inputs, outputs = network_io(network)
    check_network(manifest, stage, inputs, outputs)

    config = builder.create_builder_config()
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if trt.__name__ == "tensorrt_rtx":
        config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), 0)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profiles = graph_profiles(manifest, stage)
    for p in profiles:
        (profile.set_shape_input if p.shape_input else profile.set_shape)(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "no error message"
        raise CovipalError(f"TensorRT could not build {onnx_path.name}: {detail} (this process's peak RSS "
                           f"{gib(peak_rss_bytes())}; {gib(available_bytes())} of memory still available)")
    (engine_dir / f"{stage}.engine").write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = EngineInfo(stage, onnx_path.name, sha256_of(onnx_path), trt.__name__, trt.__version__, target, inputs,
                      outputs, profiles, workspace_mb, round(time.perf_counter() - start, 2), gather, peak_rss_bytes())
    write_engine_info(info, engine_dir)
    return info


def _why(manifest: Manifest, stage: str, errors: str) -> str:
    """What a known parser refusal means for this export, and what to do instead."""
    quantization = manifest.quantization
    if stage == names.DECODER and quantization is not None and "Scale coefficients must all be positive" in errors:
        low = -(2 ** (quantization.bits - 1))
        return (f" (ONNX Runtime's symmetric int{quantization.bits} grid maps a block's largest-magnitude weight to "
                f"{low}, so the block's scale is negative when that weight is positive, and the same integers cannot "
                f"be had with a positive scale ({-low} is out of range): export with --quant int4 for TensorRT; this "
                f"export's {manifest.graphs[stage].file} still runs on ONNX Runtime)")
    return ""


def check_gather(gather: str, trt: ModuleType) -> None:
    """Refuse the plugin gather up front under TensorRT-RTX: it aborts the whole process on a custom plugin node."""
    if gather == "plugin" and trt.__name__ == "tensorrt_rtx":
        raise CovipalError("TensorRT-RTX cannot take custom plugins (its ONNX parser aborts the process on one); "
                           "use --gather native, or build with full TensorRT")


def build_engines(directory: str | Path, *, module: str | None = None, gather: str = "native",
                  workspace_mb: int | None = None, compute_capability: str | None = None) -> list[EngineInfo]:
    """Engines for every graph of an export directory into `DIR/trt/`, replaced only when all built."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    trt = import_tensorrt(module)
    check_gather(gather, trt)
    target = build_target(trt, compute_capability)
    timing_cache = directory.resolve().parent / TIMING_CACHE
    scratch = directory / f".{names.ENGINE_DIR}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        infos = [build_engine(trt, manifest, directory, stage, scratch, workspace_mb=workspace_mb,
                              target=target, timing_cache=timing_cache, gather=gather)
                 for stage in tqdm(names.STAGES, desc=f"TensorRT engines ({trt.__name__} {trt.__version__})",
                                   unit="engine", file=sys.stderr)]
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(directory / names.ENGINE_DIR, ignore_errors=True)
    scratch.rename(directory / names.ENGINE_DIR)
    return infos
