"""llama.cpp's Q4_1 grid for the decoder's weights: gguf-py quantizes, ONNX Runtime's packer writes MatMulNBits.

Q4_1 cuts each weight's input dimension into blocks of 32 and stores, per block, a scale `d`, a minimum `m`
(both fp16) and 32 integers q in [0, 15]:  W ~= d * q + m.  Rounding to that grid is gguf-py's `Q4_1`
(`gguf.quants.quantize`, ggml-org's port of llama.cpp's reference quantizer), not ours.

Neither of our forms may carry a zero point (TensorRT's DequantizeLinear takes none), so the minimum is
written as an offset term beside a symmetric dequantize:

    W = d * (q - 8) + c,        c = m + 8 d           (one offset a block)
    x @ W = x @ (d * (q - 8)) + blocksum(x) @ c    blocksum(x) [.., K/32]: x summed over each block of 32

    decoder.onnx      MatMulNBits(x; q, scales d; no zero points, so its implicit 8)  -> Add <- MatMul(blocksum(x), c)
    decoder.qdq.onnx  the same, with DequantizeLinear(q - 8, d) -> MatMul in place of MatMulNBits (`qdq.py`)

blocksum is Reshape [B, S, K] -> [B, S, K/32, 32] and ReduceSum over the last axis, once per distinct input (q, k
and v share theirs). The offsets are `{MatMulNBits name}_offsets` [K/32, N], in the export dtype.

A model whose weights came from a Q4_1 GGUF (mini-llava's SmolLM2-135M) gets every integer, scale and minimum of
that file back: the grid is the file's, so this int4 decoder loses nothing but the fp32 rounding of c.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32  # Q4_1's block
ZERO = 8  # MatMulNBits' implicit zero point for 4 bits: it computes (q - 8) * scale
OFFSETS_SUFFIX = "_offsets"
LIBRARY = "gguf.quants Q4_1 (llama.cpp's quantizer, gguf-py {version}); MatMulNBits packed by onnxruntime.quantization"


def library() -> str:
    return LIBRARY.format(version=version("gguf"))


def quantize_q4_1(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [K, N] -> q [N, K/32, 32] uint8 in [0, 15], d [N, K/32] and m [N, K/32] (fp32 holding fp16 values).

    A block whose weights are all equal has d = 0 in Q4_1; it gets the smallest fp16 normal instead (its q are all
    0 and its offset m + 8 d, so it still rebuilds to m exactly) because TensorRT refuses a zero scale.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    k, n = weight.shape
    rows = np.ascontiguousarray(weight.T, dtype=np.float32)  # [N, K]: Q4_1 blocks run along each row
    blocks = quantize(rows, GGMLQuantizationType.Q4_1).reshape(n, k // BLOCK, -1)  # [N, K/32, 20] bytes
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:]  # [N, K/32, 16]: value j in the low nibble of byte j, value j + 16 in its high nibble
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # [N, K/32, 32]
    d[d == 0] = np.finfo(np.float16).tiny
    return q, d, m


def rewrite_q4_1(model: onnx.ModelProto, matmuls: list[str], accuracy_level: int) -> onnx.ModelProto:
    """Replace each MatMul named in `matmuls` (constant weight [K, N], K a multiple of 32) by MatMulNBits on the Q4_1
    integers and scales plus its block-offset MatMul; everything else is left as it is."""
    from onnxruntime.quantization.neural_compressor.weight_only import make_matmul_weight_only_node

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    chosen = set(matmuls)
    nodes, added, blocksums = [], [], {}
    for node in graph.node:
        if node.name not in chosen:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])  # [K, N]
        k, n = weight.shape
        if k % BLOCK:
            raise ValueError(f"{node.name}: Q4_1 needs an input dimension divisible by {BLOCK}, got {k}")
        q, d, m = quantize_q4_1(weight)
        nbits, inits = make_matmul_weight_only_node(
            node=node, weight_shape=(k, n), num_bits=4, group_size=BLOCK, k_blocks=k // BLOCK,
            q_weight=q.reshape(n * k // BLOCK, BLOCK), scale=d.astype(weight.dtype), zero_point=None,
            accuracy_level=accuracy_level)
        output = node.output[0]
        nbits.output[0] = f"{nbits.name}_main"
        offsets = numpy_helper.from_array((m + ZERO * d).T.astype(weight.dtype), nbits.name + OFFSETS_SUFFIX)
        if node.input[0] not in blocksums:
            blocksums[node.input[0]] = _blocksum(node.input[0], k, nodes, added)
        offset = f"{nbits.name}_offset"
        nodes += [nbits,
                  helper.make_node("MatMul", [blocksums[node.input[0]], offsets.name], [offset], name=offset),
                  helper.make_node("Add", [nbits.output[0], offset], [output], name=f"{nbits.name}_add_offset")]
        added += [*inits, offsets]
    used = {name for node in nodes for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _blocksum(x: str, k: int, nodes: list[onnx.NodeProto], added: list[onnx.TensorProto]) -> str:
    """Append Reshape + ReduceSum summing x [B, S, K] over each block of 32: returns the name of [B, S, K/32]."""
    stem = f"{x}_blocksum"
    shape = numpy_helper.from_array(np.array([0, 0, k // BLOCK, BLOCK], np.int64), f"{stem}_shape")
    axes = numpy_helper.from_array(np.array([-1], np.int64), f"{stem}_axes")
    added += [shape, axes]
    nodes += [helper.make_node("Reshape", [x, shape.name], [f"{stem}_blocks"], name=f"{stem}_reshape"),
              helper.make_node("ReduceSum", [f"{stem}_blocks", axes.name], [stem], name=stem, keepdims=0)]
    return stem

