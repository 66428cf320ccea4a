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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from covipal_export import names

QDQ_OPSET = 21  # blocked DequantizeLinear
OFFSETS_SUFFIX = "_offsets"  # {MatMulNBits name}_offsets [K/block, N]: a weight's block offsets (q4_1)
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


def offsets_name(weight_name: str) -> str:
    """The initializer of a quantized weight's block offsets (`weight_name`: its MatMulNBits node's name)."""
    return weight_name + OFFSETS_SUFFIX


def _offsets(name: str, initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    tensor = initializers.get(offsets_name(name))
    return None if tensor is None else numpy_helper.to_array(tensor)


def nbits_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> QuantizedWeight:
    """Unpack a symmetric MatMulNBits node's B and scales (it has no zero points)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) > 3 and node.input[3]:
        raise ValueError(f"{node.name}: zero points (an asymmetric grid) have no symmetric QDQ twin")
    weight = unpack_nbits(numpy_helper.to_array(initializers[node.input[1]]),
                          numpy_helper.to_array(initializers[node.input[2]]), attributes["K"], attributes["N"],
                          attributes["bits"], attributes["block_size"])
    weight.offsets = _offsets(node.name, initializers)
    return weight


def unpack_nbits(packed: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block: int) -> QuantizedWeight:
    """The integers and scales of MatMulNBits' B [N, K/block, blob] and scales [N * K/block] for a weight [K, N]."""
    scales = scales.reshape(n, -1)  # [N, K/block]
    if bits == 4:
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)  # low nibble first
    else:
        values = packed.reshape(n, -1)
    q = (values.astype(np.int16) - (1 << (bits - 1)))[:, :k]  # [N, K] (K padded up to whole blocks)
    return QuantizedWeight(q.T.astype(np.int8), scales.T.copy(), bits, block)


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
    """The QDQ twin of a MatMulNBits model: each MatMulNBits becomes DequantizeLinear -> MatMul, same weights.

    One weight is in memory at a time: the graph is read with its weights left on disk, and each weight is
    repacked as it is written."""
    model = ir.load(nbits_path)
    graph = model.graph
    for node in list(graph):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            raise ValueError(f"{node.name}: zero points (an asymmetric grid) have no symmetric QDQ twin")
        weights = [add_initializer(graph, tensor) for tensor in _qdq_tensors(node)]
        block = node.attributes["block_size"].as_int()
        dequantize = ir.node("DequantizeLinear", weights, {"axis": 0, "block_size": block}, name=f"{node.name}_dq",
                             outputs=[ir.Value(name=f"{node.name}_weight")])
        matmul = ir.node("MatMul", [node.inputs[0], dequantize.outputs[0]], name=node.name)
        replace_node(graph, node, [dequantize, matmul], node.inputs[1:3])
    model.opset_imports.pop("com.microsoft", None)  # no longer used
    model.opset_imports[""] = QDQ_OPSET
    save_ir(model, out)
    return out


def add_initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """`tensor` (named) as an initializer of `graph`."""
    value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def replace_node(graph: ir.Graph, node: ir.Node, added: list[ir.Node], weights: list[ir.Value]) -> None:
    """Put `added` where `node` was: the last added node's output takes over node's output and its name; the
    initializers in `weights` (node's) that nothing reads any more are dropped."""
    weights = list(weights)
    graph.insert_before(node, added)
    output, result = node.outputs[0], added[-1].outputs[0]
    ir.convenience.replace_all_uses_with(output, result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    result.name = output.name
    for value in weights:
        if not value.uses():
            graph.initializers.pop(value.name)


def _qdq_tensors(node: ir.Node) -> tuple[ir.LazyTensor, ir.LazyTensor]:
    """A MatMulNBits node's q [K, N] (INT4 or INT8) and scales [K/block, N], made when they are written."""
    k, n, bits, block = (node.attributes[name].as_int() for name in ("K", "N", "bits", "block_size"))
    packed, scales = node.inputs[1].const_value, node.inputs[2].const_value

    def q() -> ir.TensorProtocol:
        values = unpack_nbits(read_weight(packed), read_weight(scales), k, n, bits, block).q  # [K, N] int8
        if bits == 4:
            return ir.PackedTensor(np.frombuffer(pack_int4(values), np.uint8), ir.DataType.INT4, shape=values.shape)
        return ir.tensor(values)

    def transposed_scales() -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(read_weight(scales).reshape(n, -1).T))

    return (ir.LazyTensor(q, ir.DataType(INT_TYPES[bits]), ir.Shape([k, n]), name=f"{node.name}_q"),
            ir.LazyTensor(transposed_scales, scales.dtype, ir.Shape([-(-k // block), n]), name=f"{node.name}_scales"))


def read_weight(tensor: ir.TensorProtocol) -> np.ndarray:
    """A weight's values, copied out of the file (its memory map is closed at once)."""
    values = np.array(tensor.numpy())
    if hasattr(tensor, "release"):
        tensor.release()
    return values


def save_ir(model: ir.Model, path: Path) -> None:
    """Write `model` to `path`, its initializers in `path.data`, tensor by tensor, when they pass 128 MiB
    (`names.EXTERNAL_DATA_BYTES`).

    The files are replaced once all is written, so `model` may read its weights from the files it replaces (and
    must not be used afterwards)."""
    weights = sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value)
    data = path.name + ".data"
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        external = data if weights > names.EXTERNAL_DATA_BYTES else None
        if external is None:  # one file: weights read from external data go into it
            ir.external_data.load_to_model(model)
        ir.save(model, scratch / path.name, external_data=external, max_in_flight_bytes=2**28)
        if external is None and path.with_name(data).exists():
            os.remove(path.with_name(data))
        for written in scratch.iterdir():
            os.replace(written, path.with_name(written.name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path`, its initializers in `path.data` when they pass protobuf's 2 GB."""
    external = model.ByteSize() > 2**31 - 2**26  # ByteSize counts the initializers too
    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            os.remove(stale)
    onnx.save(model, path, save_as_external_data=external, location=path.name + ".data" if external else None)
