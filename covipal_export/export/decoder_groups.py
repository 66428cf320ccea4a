"""The decoder in groups of layers, for checking a decoder that ONNX Runtime cannot hold whole on this machine.

ONNX Runtime's CPU provider runs fp16 MatMuls in fp32 and converts their weights when a session opens, so an fp16
decoder takes twice its weights in memory (26 GB for LLaVA-1.5-7B's 13 GB); a MatMulNBits weight is held twice
too (the file's blocks and the kernel's packed copy). `ort_bytes` estimates this from the graph alone.

decoder.onnx names the hidden state between layers `hidden_states.{i}` (`onnx_export.name_layer_outputs`). The
group of layers [a, b) is the part of the graph between two of them:

    inputs   hidden_states.a (inputs_embeds for a = 0), attention_mask, position_ids, past_key_values.{a..b-1}.*
             (and inputs_embeds where the group reads its shape)
    outputs  hidden_states.b (logits for b = L), present.{a..b-1}.*

cut from the graph alone: the weights stay in the export's data file, and ONNX Runtime reads the group's only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto

from covipal_export import names
from covipal_export.runtime.ort_backend import new_session

# bytes ONNX Runtime's CPU provider holds per byte of an initializer of this type (see the module docstring)
ORT_CPU_FACTOR = {TensorProto.FLOAT16: 2, TensorProto.UINT8: 2, TensorProto.INT4: 2, TensorProto.INT8: 2}


@dataclass
class LayerGroup:
    layers: range
    model: onnx.ModelProto  # the group's graph; its weights by reference to the export's data file
    hidden_input: str  # names.INPUTS_EMBEDS or names.HIDDEN_STATES % a
    hidden_output: str  # names.HIDDEN_STATES % b or names.LOGITS

    @property
    def input_names(self) -> list[str]:
        return [value.name for value in self.model.graph.input]


def ort_bytes(model: onnx.ModelProto) -> int:
    """About what ONNX Runtime on the CPU holds for the initializers of `model` (loaded with or without their data)."""
    total = 0
    for tensor in model.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type != TensorProto.INT4 \
            else 0.5
        total += int(count * size * ORT_CPU_FACTOR.get(tensor.data_type, 1))
    return total


def layer_groups(path: Path, num_layers: int, whole: int, budget: int) -> list[LayerGroup] | None:
    """The decoder whole when ONNX Runtime holds its weights in `whole` bytes; else consecutive layers in groups
    that each take at most `budget` (at least one layer a group; the last one holds the final norm and the LM head
    too); None when it does not fit and its graph does not name its layers' outputs (an export made before they
    were named)."""
    model = onnx.load(path, load_external_data=False)
    if ort_bytes(model) <= whole:
        return [_cut(model, 0, num_layers, num_layers)]
    produced = {output for node in model.graph.node for output in node.output}
    if any(names.HIDDEN_STATES % i not in produced for i in range(1, num_layers)):
        return None
    costs = [ort_bytes(_cut(model, i, i + 1, num_layers).model) for i in range(num_layers)]
    groups, start = [], 0
    for layer in range(1, num_layers + 1):
        if layer == num_layers or sum(costs[start:layer + 1]) > budget:
            groups.append(_cut(model, start, layer, num_layers))
            start = layer
    return groups


def open_group(group: LayerGroup, directory: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session on the group's graph, its weights read from `directory`."""
    return new_session(group.model.SerializeToString(), threads=threads, external_data_dir=directory)


def _cut(model: onnx.ModelProto, start: int, end: int, num_layers: int) -> LayerGroup:
    graph = model.graph
    hidden_input = names.INPUTS_EMBEDS if start == 0 else names.HIDDEN_STATES % start
    hidden_output = names.LOGITS if end == num_layers else names.HIDDEN_STATES % end
    outputs = [hidden_output, *names.present_names(end)[2 * start:]]
    producer = {output: node for node in graph.node for output in node.output}
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if name == hidden_input or node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(value for value in node.input if value)
    nodes = [node for node in graph.node if id(node) in needed]
    used = {value for node in nodes for value in node.input}
    embeds = next(value for value in graph.input if value.name == names.INPUTS_EMBEDS)
    hidden = onnx.ValueInfoProto()
    hidden.CopyFrom(embeds)  # [batch, sequence, D] in the export dtype, like every layer's output
    inputs = [value for value in graph.input if value.name in used or value.name == hidden_input]
    if start > 0:
        hidden.name = hidden_input
        inputs.append(hidden)
    declared = {value.name: value for value in graph.output}
    if hidden_output not in declared:
        output = onnx.ValueInfoProto()
        output.CopyFrom(embeds)
        output.name = hidden_output
        declared[hidden_output] = output
    cut = onnx.helper.make_graph(nodes, f"{graph.name}_layers_{start}_{end}", inputs,
                                 [declared[name] for name in outputs],
                                 [tensor for tensor in graph.initializer if tensor.name in used])
    group = onnx.helper.make_model(cut, opset_imports=model.opset_import, ir_version=model.ir_version)
    return LayerGroup(range(start, end), group, hidden_input, hidden_output)
