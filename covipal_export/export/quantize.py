"""Weight-only INT8 / INT4 decoders: ONNX Runtime's quantizer writes one form; the other is repacked from it.

    QuantOptions        what `--quant`, `--quant-block`, `--quant-method`, `--quant-lm-head` ask for (checked)
    quantize_export     an export directory's decoder quantized in place, its manifest rewritten
    quantize_decoder    decoder.onnx (MatMul on fp32/fp16 weights)
                          -> decoder.onnx       com.microsoft.MatMulNBits, for ONNX Runtime's CPU and CUDA kernels
                          -> decoder.qdq.onnx   the same integers and scales as INT4/INT8 DequantizeLinear -> MatMul
                                                (opset 21, blocked, symmetric), for TensorRT (`qdq.py`)

The quantizers are ONNX Runtime's, the maintained ones of the runtime we ship on every machine; both write a
symmetric grid (no zero points, which TensorRT's dequantize rejects) in blocks of `--quant-block` along each
weight's input dimension:

    rtn    round to nearest, int8 or int4, in seconds: the block quantizer of `onnxruntime.quantization`'s
           `MatMulNBitsQuantizer` (`DefaultWeightOnlyQuantizer`), applied one weight at a time (`nbits.py`)
    q4_1   llama.cpp's Q4_1 through gguf-py: round to nearest between each block's minimum and maximum, a scale and
           a minimum per 32 weights; int4, blocks of 32; the minimum becomes a block-offset MatMul (`q4_1.py`), so
           both forms still have no zero points. It keeps a Q4_1 GGUF's grid exactly (mini-llava's SmolLM2)
    gptq   `onnxruntime.quantization.neural_compressor.weight_only.gptq_quantize` (what MatMulNBitsQuantizer runs for
           its GPTQWeightOnlyQuantConfig; called directly so the LM head can stay out), fed each layer's inputs on
           `--calib` real prompts (`calibration.py`); int4 only (its 8-bit result is not packed). In onnxruntime
           1.32 its error updates read zeros, so the data changes nothing, and its result is re-rounded with new
           scales: worse than rtn (docs/BENCHMARKS.md, "Calibrated int4: GPTQ")
    awq    NVIDIA ModelOpt's awq_lite scales, searched on `--calib` real prompts and folded into the PyTorch model's
           weights before the decoder is exported (`awq.py`, in the exporter); here its weights are rounded as rtn's;
           int4 only

Every MatMul with a constant weight is quantized (q/k/v/o, gate/up/down in each layer); the LM head only with
`--quant-lm-head`. Activations stay in the export dtype (accuracy level 0 would also keep them there inside the
kernel; we use `ACCURACY_LEVEL`, see below).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.export.awq import library as awq_library
from covipal_export.export.calibration import CalibrationSet, calibration_pairs, decoder_feeds
from covipal_export.export.nbits import quantize_matmuls, rtn_quantizer
from covipal_export.export.q4_1 import BLOCK as Q4_1_BLOCK
from covipal_export.export.q4_1 import library as q4_1_library
from covipal_export.export.q4_1 import q4_1_nbits
from covipal_export.export.qdq import save_model, write_qdq_form
from covipal_export.manifest import GraphSpec, Manifest, QuantizationSpec, describe_files, save_manifest

QUANT_BITS = {"none": None, "int8": 8, "int4": 4}
METHODS = ("rtn", "q4_1", "gptq", "awq")
CALIBRATED = ("gptq", "awq")
UNCALIBRATED = tuple(method for method in METHODS if method not in CALIBRATED)  # rtn, q4_1: each weight alone
DEFAULT_CALIB = 16  # (image, question) pairs; about a minute each for mini-llava here (see docs/BENCHMARKS.md)
AWQ_AT_EXPORT = ("--quant-method awq scales the PyTorch model's weights before the decoder is exported: run "
                 "export.py --quant int4 --quant-method awq (an exported decoder cannot be given AWQ afterwards)")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes powers of two from 16
# the group size when --quant-block is not given. int4: 32, as SmolLM2's GGUF (Q4_1) and llama.cpp's Q4/Q8. int8: 16,
# because at ACCURACY_LEVEL the activations are quantized to int8 in the weight's blocks too, and at 32 that cost
# int8 1.1-1.6 points at 16 visual tokens on mini-llava (at 16: within 0.3; docs/BENCHMARKS.md)
DEFAULT_BLOCKS = {"int8": 16, "int4": 32}
# MatMulNBits' accuracy level 4 computes with the activations quantized to int8 inside the kernel (as llama.cpp's
# q8_1 dot products do); it is ONNX Runtime's fast CPU path and what its fused QDQ form uses by default.
ACCURACY_LEVEL = 4
QDQ_SUFFIX = ".qdq.onnx"
LIBRARIES = {"rtn": "onnxruntime.quantization.matmul_nbits_quantizer.DefaultWeightOnlyQuantizer, one weight at a time",
             "gptq": "onnxruntime.quantization.neural_compressor.weight_only.gptq_quantize"}


@dataclass
class QuantOptions:
    """Weight-only quantization of the decoder; `quant` "none" leaves it in the export dtype."""

    quant: str = "none"  # none | int8 | int4
    block: int | None = None  # group size along the input dimension (None: DEFAULT_BLOCKS[quant])
    method: str | None = None  # rtn (the default when quantizing) | q4_1 | gptq | awq
    lm_head: bool = False  # also quantize the LM head
    calib: int | None = None  # calibration pairs, for a calibrated method (default DEFAULT_CALIB)

    def __post_init__(self) -> None:
        if self.quant not in QUANT_BITS:
            raise CovipalError(f"--quant must be one of {', '.join(QUANT_BITS)}, got {self.quant!r}")
        if self.block is None and self.quant != "none":
            self.block = DEFAULT_BLOCKS[self.quant]
        if self.block is not None and self.block not in BLOCK_SIZES:
            raise CovipalError(f"--quant-block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block}")
        if self.quant == "none" and (self.method is not None or self.lm_head or self.calib is not None):
            flag = ("--quant-method" if self.method is not None else "--quant-lm-head" if self.lm_head
                    else "--calib")
            raise CovipalError(f"{flag} needs --quant int8 or int4 (the decoder is not quantized with --quant none)")
        if self.method is not None and self.method not in METHODS:
            raise CovipalError(f"--quant-method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.calib is not None and self.chosen_method not in CALIBRATED:
            raise CovipalError(f"--calib needs a calibrated --quant-method (awq, gptq); {self.chosen_method} rounds "
                               f"each weight on its own")
        if self.calib is not None and self.calib < 1:
            raise CovipalError(f"--calib must be at least 1, got {self.calib}")
        if self.method == "q4_1" and self.bits != 4:
            raise CovipalError("--quant-method q4_1 is a 4-bit grid (llama.cpp's Q4_1); use --quant int4, or rtn "
                               "for int8")
        if self.method == "q4_1" and self.block != Q4_1_BLOCK:
            raise CovipalError(f"--quant-method q4_1 quantizes blocks of {Q4_1_BLOCK} weights (llama.cpp's Q4_1), "
                               f"got --quant-block {self.block}")
        if self.method == "awq" and self.bits != 4:
            raise CovipalError("--quant-method awq writes int4 only (ModelOpt's INT4 AWQ); use --quant int4, or rtn "
                               "for int8")
        if self.method == "gptq" and self.bits != 4:
            raise CovipalError("--quant-method gptq writes int4 only (ONNX Runtime's GPTQ packs 4-bit MatMulNBits; "
                               "its 8-bit result is not quantized); use --quant int4, or rtn for int8")

    @property
    def bits(self) -> int | None:
        return QUANT_BITS[self.quant]

    @property
    def chosen_method(self) -> str:
        return self.method or METHODS[0]

    @property
    def calibration_count(self) -> int | None:
        """How many (image, question) pairs calibrate the method; None for rtn."""
        if self.chosen_method not in CALIBRATED:
            return None
        return self.calib or DEFAULT_CALIB

    def made(self, spec: QuantizationSpec | None) -> bool:
        """Whether a manifest's quantization entry is what these options make (bits, block, method, LM head,
        calibration count)."""
        count = spec.calibration["count"] if spec is not None and spec.calibration else None
        return spec is not None and (spec.bits, spec.block_size, spec.method, spec.lm_head, count) == (
            self.bits, self.block, self.chosen_method, self.lm_head, self.calibration_count)

    def calibration_set(self, model_name: str) -> CalibrationSet | None:
        """The pairs a calibrated method sees (checked before anything is exported); None for rtn."""
        count = self.calibration_count
        return None if count is None else calibration_pairs(model_name, count)


def lm_head_node(model: onnx.ModelProto) -> str | None:
    """The MatMul that writes the logits output (the LM head), or None."""
    return next((node.name for node in model.graph.node
                 if node.op_type == "MatMul" and names.LOGITS in node.output), None)


def constant_matmuls(model: onnx.ModelProto) -> list[str]:
    """The MatMul nodes whose weight (input B) is an initializer: what a weight-only quantizer can quantize."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]


def quantize_export(directory: Path, manifest: Manifest, options: QuantOptions,
                    calibration: CalibrationSet | None = None, awq_scaled: bool = False) -> Manifest:
    """Quantize the decoder of an export directory in place (both forms) and rewrite its manifest. gptq runs
    `calibration` (default: `options.calibration_set`) through the directory's unquantized graphs; awq needs
    `awq_scaled`: the exporter folded AWQ's scales, searched on `calibration`, into the weights already."""
    if manifest.quantization is not None:
        raise CovipalError(f"{directory}: the decoder is quantized already ({manifest.quantization.summary()})")
    if options.chosen_method == "awq" and not awq_scaled:
        raise CovipalError(AWQ_AT_EXPORT)
    calibration = calibration or options.calibration_set(manifest.model.name)
    feeds = decoder_feeds(Path(directory), calibration) if options.chosen_method == "gptq" else None
    graph, quantization = quantize_decoder(directory, manifest.graphs[names.DECODER], options, feeds)
    if calibration is not None:
        quantization.calibration = calibration.record()
    manifest.graphs[names.DECODER], manifest.quantization = graph, quantization
    manifest.resources = None  # an export's own record; quantizing a copy is not that export
    manifest.files = describe_files(directory)
    save_manifest(manifest, directory)
    return manifest


def quantize_decoder(directory: Path, graph: GraphSpec, options: QuantOptions,
                     feeds: list[dict[str, np.ndarray]] | None = None) -> tuple[GraphSpec, QuantizationSpec]:
    """Quantize `directory/decoder.onnx` in place and write its QDQ twin beside it; returns the updated graph spec
    (same inputs and outputs) and the manifest's quantization entry (`feeds`: the decoder inputs a calibrated
    method sees)."""
    path = Path(directory) / graph.file
    model = onnx.load(path, load_external_data=False)  # the graph; weights in external data stay on disk
    lm_head = lm_head_node(model)
    if lm_head is None:
        raise CovipalError(f"{graph.file}: no MatMul writes {names.LOGITS}, so the LM head cannot be told apart")
    excluded = [] if options.lm_head else [lm_head]
    candidates = constant_matmuls(model)
    quantized = [name for name in candidates if name not in excluded]
    if not quantized:
        raise CovipalError(f"{graph.file} has no MatMul with a constant weight to quantize")
    if options.chosen_method == "gptq":
        if not feeds:
            raise CovipalError("--quant-method gptq needs calibration inputs (none were given)")
        onnx.load_external_data_for_model(model, str(path.parent))  # GPTQ runs the whole model
        save_model(_run_gptq(model, options, quantized, feeds), path)  # one file again when it fits in 2 GB
    else:  # rtn, awq, q4_1: one weight in memory at a time; one file again when the weights fit in 128 MiB
        quantize = q4_1_nbits if options.chosen_method == "q4_1" else rtn_quantizer(options.bits, options.block,
                                                                                       ACCURACY_LEVEL)
        quantize_matmuls(path, quantized, options.bits, options.block, ACCURACY_LEVEL, quantize)
    external = path.name + ".data" if path.with_name(path.name + ".data").exists() else None
    graph = GraphSpec(graph.file, external, graph.inputs, graph.outputs)
    qdq_file = write_qdq_form(path, path.with_name(path.stem + QDQ_SUFFIX))
    layers = (f"{len(quantized)} of {len(candidates)} MatMuls with constant weights (every linear layer"
              f"{', the LM head included' if options.lm_head else '; not the LM head'})")
    if options.chosen_method == "q4_1":
        library = q4_1_library()
    elif options.chosen_method == "awq":  # the weights hold AWQ's scales; rounded as rtn's
        library = f"{awq_library()} scales, then {LIBRARIES['rtn']}"
    else:
        library = LIBRARIES[options.chosen_method]
    spec = QuantizationSpec(bits=options.bits, block_size=options.block, method=options.chosen_method,
                            symmetric=options.chosen_method != "q4_1", accuracy_level=ACCURACY_LEVEL, layers=layers,
                            quantized_matmuls=quantized, lm_head=options.lm_head, calibration=None,
                            library=f"{library} (onnxruntime {onnxruntime.__version__})", trt_file=qdq_file.name,
                            block_offsets=options.chosen_method == "q4_1")
    return graph, spec


def _run_gptq(model: onnx.ModelProto, options: QuantOptions, quantized: list[str],
              feeds: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """ONNX Runtime's GPTQ on `quantized` (symmetric, blocks of options.block), calibrated on `feeds`; the other
    MatMuls (the LM head without --quant-lm-head) stay as they are."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq_quantize

    weight_config = {name: {"bits": options.bits, "group_size": options.block, "scheme": "sym", "algorithm": "GPTQ"}
                     for name in quantized}
    weight_config.update({name: "fp32" for name in constant_matmuls(model) if name not in quantized})
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its own progress bar, printed to stdout
            result = gptq_quantize(model, ((feed, None) for feed in feeds), weight_config=weight_config,
                                   num_bits=options.bits, group_size=options.block, scheme="sym", n_samples=-1,
                                   accuracy_level=ACCURACY_LEVEL)
    finally:
        logging.disable(logging.NOTSET)
    return result.model
