"""One set of quantized weights in two forms: ONNX Runtime's MatMulNBits and TensorRT's DequantizeLinear -> MatMul.

A symmetric MatMulNBits node (com.microsoft) holds, for a weight W [K, N] cut into blocks of `block_size` along K:

    B       uint8 [N, K/block, block*bits/8]   the integers q + 2^(bits-1), two 4-bit values a byte (low nibble first)
    scales  [N * K/block] (or [N, K/block])    one scale a block;  W ~= q * scale,  q in [-2^(bits-1), 2^(bits-1) - 1]

The QDQ form stores the same q as an INT4 / INT8 initializer [K, N] and the scales as [K/block, N], and
`DequantizeLinear(axis=0, block_size)` (opset 21, no zero point) rebuilds W before a plain MatMul, which
TensorRT builds as weight-only quantization. Repacking is exact: both forms hold the same integers and
scales (`quantized_weights` reads either form back, and the tests compare them bit for bit).
The Q4_1 grid (`q4_1.py`) adds a block-offset MatMul beside each quantized one, the same in both forms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from covipal_export.export.q4_1 import OFFSETS_SUFFIX

QDQ_OPSET = 21  # blocked DequantizeLinear
INT_TYPES = {4: TensorProto.INT4, 8: TensorProto.INT8}


@dataclass
class QuantizedWeight:
    """The integers and scales of one quantized MatMul weight, whichever form they were read from."""

    q: np.ndarray  # [K, N] int8, in [-2^(bits-1), 2^(bits-1) - 1]
    scales: np.ndarray  # [K/block, N], the activations' dtype
    bits: int
    block_size: int
    offsets: np.ndarray | None = None  # [K/block, N] per-block offsets (the Q4_1 grid's minimum), or None

    def same_as(self, other: "QuantizedWeight") -> bool:
        """The same grid, and bit-identical integers, scales and offsets."""
        same_offsets = (self.offsets is None and other.offsets is None) or (
            self.offsets is not None and other.offsets is not None and np.array_equal(self.offsets, other.offsets))
        return ((self.bits, self.block_size) == (other.bits, other.block_size) and np.array_equal(self.q, other.q)
                and np.array_equal(self.scales, other.scales) and same_offsets)


def _offsets(name: str, initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    tensor = initializers.get(name + OFFSETS_SUFFIX)
    return None if tensor is None else numpy_helper.to_array(tensor)


def nbits_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> QuantizedWeight:
    """Unpack a symmetric MatMulNBits node's B and scales (it has no zero points)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attributes["K"], attributes["N"], attributes["bits"], attributes["block_size"]
    if len(node.input) > 3 and node.input[3]:
        raise ValueError(f"{node.name}: zero points (an asymmetric grid) have no symmetric QDQ twin")
    packed = numpy_helper.to_array(initializers[node.input[1]])  # [N, K/block, blob]
    scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, -1)  # [N, K/block]
    if bits == 4:
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)  # low nibble first
    else:
        values = packed.reshape(n, -1)
    q = (values.astype(np.int16) - (1 << (bits - 1)))[:, :k]  # [N, K] (K padded up to whole blocks)
    return QuantizedWeight(q.T.astype(np.int8), scales.T.copy(), bits, block, _offsets(node.name, initializers))


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX's INT4 raw data: row-major, two values a byte, the first in the low nibble."""
    flat = (q.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def unpack_int4(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    data = np.frombuffer(raw, dtype=np.uint8)
    values = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(-1)[: int(np.prod(shape))]
    return (values.astype(np.int16) - ((values & 0x08).astype(np.int16) << 1)).astype(np.int8).reshape(shape)


def dq_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> QuantizedWeight:
    """Read back the integers and scales of a blocked DequantizeLinear node."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    tensor = initializers[node.input[0]]
    if tensor.data_type == TensorProto.INT4:
        q, bits = unpack_int4(tensor.raw_data, tuple(tensor.dims)), 4
    else:
        q, bits = numpy_helper.to_array(tensor).astype(np.int8), 8
    return QuantizedWeight(q, numpy_helper.to_array(initializers[node.input[1]]), bits, attributes["block_size"],
                           _offsets(node.name.removesuffix("_dq"), initializers))


def quantized_weights(model: onnx.ModelProto) -> dict[str, QuantizedWeight]:
    """Every quantized weight of a model in either form, keyed by the MatMul it feeds (the original node name)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            found[node.name] = nbits_weight(node, initializers)
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            found[node.name.removesuffix("_dq")] = dq_weight(node, initializers)
    return found


def write_qdq_form(nbits_path: Path, out: Path) -> Path:
    """The QDQ twin of a MatMulNBits model: each MatMulNBits becomes DequantizeLinear -> MatMul, same weights."""
    model = onnx.load(nbits_path)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes, added = [], []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        weight = nbits_weight(node, initializers)
        q_name, scale_name, dequantized = f"{node.name}_q", f"{node.name}_scales", f"{node.name}_weight"
        if weight.bits == 4:
            q = helper.make_tensor(q_name, TensorProto.INT4, weight.q.shape, pack_int4(weight.q), raw=True)
        else:
            q = numpy_helper.from_array(weight.q, q_name)
        added += [q, numpy_helper.from_array(weight.scales, scale_name)]
        nodes.append(helper.make_node("DequantizeLinear", [q_name, scale_name], [dequantized], name=f"{node.name}_dq",
                                      axis=0, block_size=weight.block_size))
        nodes.append(helper.make_node("MatMul", [node.input[0], dequantized], list(node.output), name=node.name))
    used = {name for node in nodes for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    domains = {node.domain for node in nodes} - {"", "ai.onnx"}  # com.microsoft is no longer used
    opsets = [helper.make_opsetid("", QDQ_OPSET)] + [o for o in model.opset_import if o.domain in domains]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    save_model(model, out)
    return out


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path`, its initializers in `path.data` when they pass protobuf's 2 GB."""
    external = model.ByteSize() > 2**31 - 2**26  # ByteSize counts the initializers too
    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            os.remove(stale)
    onnx.save(model, path, save_as_external_data=external, location=path.name + ".data" if external else None)
