"""Weight-only INT8 / INT4 decoders: ONNX Runtime's quantizer writes one form; the other is repacked from it.

    QuantOptions        what `--quant`, `--quant-block`, `--quant-method`, `--quant-lm-head` ask for (checked)
    quantize_export     an export directory's decoder quantized in place, its manifest rewritten
    quantize_decoder    decoder.onnx (MatMul on fp32/fp16 weights)
                          -> decoder.onnx       com.microsoft.MatMulNBits, for ONNX Runtime's CPU and CUDA kernels
                          -> decoder.qdq.onnx   the same integers and scales as INT4/INT8 DequantizeLinear -> MatMul
                                                (opset 21, blocked, symmetric), for TensorRT (`qdq.py`)

The quantizer is `onnxruntime.quantization.MatMulNBitsQuantizer` (round to nearest, symmetric, blocks of
`--quant-block` along each weight's input dimension): it is the maintained quantizer of the runtime we ship
on every machine, it runs on the CPU in seconds, and its symmetric grid is the one TensorRT's dequantize
takes (no zero points). Every MatMul with a constant weight is quantized (q/k/v/o, gate/up/down in each
layer); the LM head only with `--quant-lm-head`. Activations stay in the export dtype (accuracy level 0
would also keep them there inside the kernel; we use `ACCURACY_LEVEL`, see below).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.export.qdq import save_model, write_qdq_form
from covipal_export.manifest import GraphSpec, Manifest, QuantizationSpec, describe_files, save_manifest

QUANT_BITS = {"none": None, "int8": 8, "int4": 4}
METHODS = ("rtn",)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes powers of two from 16
DEFAULT_BLOCK = 32  # SmolLM2's GGUF (Q4_1) and llama.cpp's Q4/Q8 use blocks of 32
# MatMulNBits' accuracy level 4 computes with the activations quantized to int8 inside the kernel (as llama.cpp's
# q8_1 dot products do); it is ONNX Runtime's fast CPU path and what its fused QDQ form uses by default.
ACCURACY_LEVEL = 4
QDQ_SUFFIX = ".qdq.onnx"
LIBRARY = f"onnxruntime.quantization.MatMulNBitsQuantizer (onnxruntime {onnxruntime.__version__})"


@dataclass
class QuantOptions:
    """Weight-only quantization of the decoder; `quant` "none" leaves it in the export dtype."""

    quant: str = "none"  # none | int8 | int4
    block: int = DEFAULT_BLOCK  # group size along the input dimension
    method: str | None = None  # rtn (the default when quantizing)
    lm_head: bool = False  # also quantize the LM head

    def __post_init__(self) -> None:
        if self.quant not in QUANT_BITS:
            raise CovipalError(f"--quant must be one of {', '.join(QUANT_BITS)}, got {self.quant!r}")
        if self.block not in BLOCK_SIZES:
            raise CovipalError(f"--quant-block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block}")
        if self.quant == "none" and (self.method is not None or self.lm_head):
            flag = "--quant-method" if self.method is not None else "--quant-lm-head"
            raise CovipalError(f"{flag} needs --quant int8 or int4 (the decoder is not quantized with --quant none)")
        if self.method is not None and self.method not in METHODS:
            raise CovipalError(f"--quant-method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @property
    def bits(self) -> int | None:
        return QUANT_BITS[self.quant]

    @property
    def chosen_method(self) -> str:
        return self.method or METHODS[0]

    def made(self, spec: QuantizationSpec | None) -> bool:
        """Whether a manifest's quantization entry is what these options make (bits, block, method, LM head)."""
        return spec is not None and (spec.bits, spec.block_size, spec.method, spec.lm_head) == (
            self.bits, self.block, self.chosen_method, self.lm_head)


def lm_head_node(model: onnx.ModelProto) -> str | None:
    """The MatMul that writes the logits output (the LM head), or None."""
    return next((node.name for node in model.graph.node
                 if node.op_type == "MatMul" and names.LOGITS in node.output), None)


def constant_matmuls(model: onnx.ModelProto) -> list[str]:
    """The MatMul nodes whose weight (input B) is an initializer: what a weight-only quantizer can quantize."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]


def quantize_export(directory: Path, manifest: Manifest, options: QuantOptions) -> Manifest:
    """Quantize the decoder of an export directory in place (both forms) and rewrite its manifest."""
    if manifest.quantization is not None:
        raise CovipalError(f"{directory}: the decoder is quantized already ({manifest.quantization.summary()})")
    graph, quantization = quantize_decoder(directory, manifest.graphs[names.DECODER], options)
    manifest.graphs[names.DECODER], manifest.quantization = graph, quantization
    manifest.files = describe_files(directory)
    save_manifest(manifest, directory)
    return manifest


def quantize_decoder(directory: Path, graph: GraphSpec, options: QuantOptions) -> tuple[GraphSpec, QuantizationSpec]:
    """Quantize `directory/decoder.onnx` in place and write its QDQ twin beside it; returns the updated graph spec
    (same inputs and outputs) and the manifest's quantization entry."""
    path = Path(directory) / graph.file
    model = onnx.load(path)  # external data, if any, is read in
    lm_head = lm_head_node(model)
    if lm_head is None:
        raise CovipalError(f"{graph.file}: no MatMul writes {names.LOGITS}, so the LM head cannot be told apart")
    excluded = [] if options.lm_head else [lm_head]
    candidates = constant_matmuls(model)
    quantized = [name for name in candidates if name not in excluded]
    if not quantized:
        raise CovipalError(f"{graph.file} has no MatMul with a constant weight to quantize")
    model = _run_quantizer(model, options, excluded)
    save_model(model, path)  # one file again when the quantized weights fit in protobuf's 2 GB
    external = path.name + ".data" if path.with_name(path.name + ".data").exists() else None
    graph = GraphSpec(graph.file, external, graph.inputs, graph.outputs)
    qdq_file = write_qdq_form(path, path.with_name(path.stem + QDQ_SUFFIX))
    layers = (f"{len(quantized)} of {len(candidates)} MatMuls with constant weights (every linear layer"
              f"{', the LM head included' if options.lm_head else '; not the LM head'})")
    spec = QuantizationSpec(bits=options.bits, block_size=options.block, method=options.chosen_method,
                            symmetric=True, accuracy_level=ACCURACY_LEVEL, layers=layers,
                            quantized_matmuls=quantized, lm_head=options.lm_head, calibration=None,
                            library=LIBRARY, trt_file=qdq_file.name)
    return graph, spec


def _run_quantizer(model: onnx.ModelProto, options: QuantOptions, excluded: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=options.block, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                          bits=options.bits)
    logging.disable(logging.INFO)  # the quantizer logs every node it looks at
    try:
        quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=excluded)
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    return quantizer.model.model
