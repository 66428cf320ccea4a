"""Weight-only MatMulNBits in a graph, one weight read at a time: round to nearest (rtn) or llama.cpp's Q4_1 grid.

ONNX Runtime's `MatMulNBitsQuantizer` takes the whole model into memory (a 13 GB fp16 decoder, then its quantized
weights beside it). This reads one weight at a time from the graph's file, has a library quantize it, and writes
the nodes `MatMulNBitsQuantizer` writes:

    MatMul(A, W [K, N])  ->  MatMulNBits(A, W_Q{bits} [N, K/block, block*bits/8] uint8, W_scales [N, K/block];
                                         K, N, bits, block_size, accuracy_level), named {MatMul}_Q{bits}

    rtn     the per-weight block quantizer `MatMulNBitsQuantizer`'s RTN calls
            (`DefaultWeightOnlyQuantizer.qbits_block_quant`): symmetric, int8 or int4
    q4_1    gguf-py's Q4_1 (`q4_1.py`); its block minimum is an offset term beside the MatMulNBits node:
                blocksum = ReduceSum(Reshape(A, [B, S, K/32, 32]), -1)        once per distinct A (q, k and v share it)
                {MatMulNBits}_main + MatMul(blocksum, {MatMulNBits}_offsets [K/32, N])  -> the MatMul's output

Only the quantized weights (a quarter of fp16's size for int4) are held until the graph is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from covipal_export.export.qdq import add_initializer, offsets_name, read_weight, replace_node, save_ir


@dataclass
class NBitsWeight:
    """One weight [K, N] as MatMulNBits stores it."""

    packed: np.ndarray  # [N, K/block, block*bits/8] uint8: q + 2^(bits-1), two 4-bit values a byte, low nibble first
    scales: np.ndarray  # [N, K/block], the weight's dtype
    offsets: np.ndarray | None = None  # [K/block, N]: added to every weight of a block (q4_1), or None


Quantizer = Callable[[np.ndarray], NBitsWeight]  # weight [K, N] -> its MatMulNBits form


def rtn_quantizer(bits: int, block: int, accuracy_level: int) -> Quantizer:
    """ONNX Runtime's symmetric round-to-nearest block quantizer, as `MatMulNBitsQuantizer` runs it."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=True, accuracy_level=accuracy_level, bits=bits))

    def quantize(weight: np.ndarray) -> NBitsWeight:
        packed, scales, _ = quantizer.qbits_block_quant(weight)  # [N, K/block, blob], [N, K/block]
        return NBitsWeight(packed, scales)

    return quantize


def quantize_matmuls(path: Path, matmuls: list[str], bits: int, block: int, accuracy_level: int,
                     quantize: Quantizer) -> None:
    """Replace the MatMuls named `matmuls` in the graph at `path` by MatMulNBits (plus their offset terms), in place."""
    model = ir.load(path)  # weights in external data stay on disk until read
    graph, wanted = model.graph, set(matmuls)
    blocksums: dict[str, ir.Value] = {}
    for node in list(graph):
        if node.name not in wanted:
            continue
        activations, weight = node.inputs
        tensor = weight.const_value
        k, n = tensor.shape
        quantized = quantize(read_weight(tensor))
        name = f"{node.name}_Q{bits}"
        attributes = {"K": k, "N": n, "bits": bits, "block_size": block}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        inputs = [activations, _initializer(graph, f"{weight.name}_Q{bits}", quantized.packed),
                  _initializer(graph, f"{weight.name}_scales", quantized.scales)]
        replacement = ir.node("MatMulNBits", inputs, attributes, domain="com.microsoft", name=name)
        added = [replacement]
        if quantized.offsets is not None:
            if activations.name not in blocksums:
                blocksums[activations.name] = _blocksum(graph, activations, k, block, added)
            offset = ir.node("MatMul", [blocksums[activations.name],
                                        _initializer(graph, offsets_name(name), quantized.offsets)],
                             name=f"{name}_offset", outputs=[ir.Value(name=f"{name}_offset")])
            replacement.outputs[0].name = f"{name}_main"
            added += [offset, ir.node("Add", [replacement.outputs[0], offset.outputs[0]], name=f"{name}_add_offset")]
        replace_node(graph, node, added, [weight])
    model.opset_imports["com.microsoft"] = 1
    save_ir(model, Path(path))


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return add_initializer(graph, ir.tensor(array, name=name))


def _blocksum(graph: ir.Graph, activations: ir.Value, k: int, block: int, added: list[ir.Node]) -> ir.Value:
    """Reshape + ReduceSum (appended to `added`): activations [B, S, K] summed over each block -> [B, S, K/block]."""
    stem = f"{activations.name}_blocksum"
    shape = _initializer(graph, f"{stem}_shape", np.array([0, 0, k // block, block], np.int64))
    axes = _initializer(graph, f"{stem}_axes", np.array([-1], np.int64))
    reshape = ir.node("Reshape", [activations, shape], name=f"{stem}_reshape",
                      outputs=[ir.Value(name=f"{stem}_blocks")])
    reduce = ir.node("ReduceSum", [reshape.outputs[0], axes], {"keepdims": 0}, name=stem,
                     outputs=[ir.Value(name=stem)])
    added += [reshape, reduce]
    return reduce.outputs[0]
