"""Round-to-nearest weight-only quantization of a graph's MatMuls, one weight read at a time.

ONNX Runtime's `MatMulNBitsQuantizer` takes the whole model into memory (a 13 GB fp16 decoder, then its quantized
weights beside it). This runs the same per-weight block quantizer (`DefaultWeightOnlyQuantizer.qbits_block_quant`,
what `MatMulNBitsQuantizer`'s RTN calls for each weight) on one weight at a time, read from the graph's file as it
is needed, and writes the nodes `MatMulNBitsQuantizer` writes:

    MatMul(A, W [K, N])  ->  MatMulNBits(A, W_Q{bits} [N, K/block, block*bits/8] uint8, W_scales [N, K/block];
                                         K, N, bits, block_size, accuracy_level), named {MatMul}_Q{bits}

Only the quantized weights (a quarter of fp16's size for int4) are held until the graph is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from covipal_export.export.qdq import save_ir


def quantize_rtn(path: Path, matmuls: list[str], bits: int, block: int, accuracy_level: int) -> None:
    """Replace the MatMuls named `matmuls` in the graph at `path` by symmetric MatMulNBits, in place."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=True, accuracy_level=accuracy_level, bits=bits))
    model = ir.load(path)  # weights in external data stay on disk until read
    graph, wanted = model.graph, set(matmuls)
    for node in list(graph):
        if node.name not in wanted:
            continue
        activations, weight = node.inputs
        tensor = weight.const_value
        k, n = tensor.shape
        packed, scales, _ = quantizer.qbits_block_quant(np.asarray(tensor.numpy()))  # [N, K/block, blob], [N, K/block]
        if hasattr(tensor, "release"):
            tensor.release()  # close its memory map: the pages read are not kept
        quantized = [ir.Value(name=f"{weight.name}{suffix}", shape=ir.Shape(array.shape),
                              type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array))
                     for suffix, array in ((f"_Q{bits}", packed), ("_scales", scales))]
        for value in quantized:
            graph.register_initializer(value)
        attributes = {"K": k, "N": n, "bits": bits, "block_size": block}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        replacement = ir.node("MatMulNBits", [activations, *quantized], attributes, domain="com.microsoft",
                              name=f"{node.name}_Q{bits}")
        graph.insert_before(node, replacement)
        output = node.outputs[0]
        ir.convenience.replace_all_uses_with(output, replacement.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        replacement.outputs[0].name = output.name
        if not weight.uses():
            graph.initializers.pop(weight.name)
    model.opset_imports["com.microsoft"] = 1
    save_ir(model, Path(path))
