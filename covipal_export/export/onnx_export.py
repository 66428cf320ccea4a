"""Export one graph: `torch.onnx.export(dynamo=True)` on an `OnnxSpec`, then describe what was written.

Why the dynamo exporter: it keeps the runtime budget as a data-dependent TopK size, gives the
dynamic dimensions the names of their `Dim`s, emits about a third of the legacy exporter's nodes
(native LayerNormalization and Gelu, no Shape/Gather chains) and the legacy TorchScript exporter is
deprecated. Opsets 18-20 only: opset 23 emits the ONNX `Attention` op, which TensorRT cannot build.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from covipal_export import names
from covipal_export.export.graphs import OnnxSpec
from covipal_export.manifest import GraphSpec, TensorSpec

EXPORTER = "torch.onnx.export(dynamo=True)"
OPSETS = (18, 19, 20)
DEFAULT_OPSET = 20
_LAYER_SCOPE = re.compile(r"\.layers\.(?:slice\([^)]*\)\.)?(\d+)$")  # `...layers.3`, `...layers.slice(None, 4, None).3`


def export_graph(spec: OnnxSpec, directory: Path, opset: int) -> GraphSpec:
    """Write `directory/<graph file>` (weights in `<graph file>.data` past 128 MiB) and return its spec.

    The graph's weights are the module's own tensors until they are written to the data file, one at a time: a
    linear layer's transposed weight is made as it is written (`transpose_weights_on_write`), not folded into a
    second copy, and a graph with large weights is not serialized whole in memory.
    """
    path = Path(directory) / names.graph_file(spec.stage)
    with quiet_exporter():
        program = torch.onnx.export(
            spec.module.eval(), spec.args, dynamo=True, opset_version=opset, verbose=False, optimize=False,
            input_names=spec.input_names, output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes,
        )
        transpose_weights_on_write(program.model)
        program.optimize()  # what export's optimize=True runs; no Transpose of a weight is left to fold
        graph = program.model.graph
        if spec.layers:
            name_layer_outputs(program.model, spec.layers)
        _rename_dims([*graph.inputs, *graph.outputs], spec.dim_names)
        weights = sum(value.const_value.nbytes for value in graph.initializers.values() if value.const_value)
        program.save(path, external_data=weights > names.EXTERNAL_DATA_BYTES)
    external = path.with_name(path.name + ".data")
    return GraphSpec(
        file=path.name,
        external_data=external.name if external.is_file() else None,
        inputs=[_tensor_spec(value) for value in graph.inputs],
        outputs=[_tensor_spec(value) for value in graph.outputs],
    )


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporter's advisory output (torchvision notices, FutureWarnings, axis-name hints)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def transpose_weights_on_write(model) -> None:
    """Replace each `Transpose(weight)` (a linear layer's `x @ W^T`) by a weight transposed when it is written.

    The optimizer would fold these Transposes into new arrays while the module still holds the originals: a second
    copy of every linear weight (13 GB for a 7B decoder in fp16). A lazy tensor makes one transposed weight at a
    time, as the file is written, and the graph is the one the optimizer would have made.
    """
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") else None
        if weight is None or not weight.is_initializer() or weight.const_value is None or len(weight.uses()) != 1:
            continue
        tensor, perm = weight.const_value, tuple(node.attributes["perm"].as_ints())
        output = node.outputs[0]
        lazy = ir.LazyTensor(lambda tensor=tensor, perm=perm: ir.tensor(np.ascontiguousarray(
            tensor.numpy().transpose(perm))), dtype=tensor.dtype, shape=ir.Shape([tensor.shape[i] for i in perm]),
            name=output.name)
        transposed = ir.Value(name=output.name, shape=lazy.shape, type=ir.TensorType(tensor.dtype), const_value=lazy)
        ir.convenience.replace_all_uses_with(output, transposed)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
        graph.register_initializer(transposed)


def name_layer_outputs(model, num_layers: int) -> bool:
    """Name the hidden state each decoder layer hands to the next `hidden_states.{i + 1}` (names.HIDDEN_STATES).

    A node belongs to layer i when the exporter's name scopes of its torch call end in `layers.i`. Each layer must
    hand exactly one value that depends on the data (not only on shapes: masks and rotary tables are shared by all
    layers) to a later part of the graph. Where that does not hold, nothing is renamed (verification then checks the
    decoder whole) and False is returned.
    """
    graph = model.graph
    data = {graph.inputs[0]}  # values computed from inputs_embeds' values
    handed: dict[int, list] = {}
    for node in graph:
        if node.op_type not in ("Shape", "Size") and any(value in data for value in node.inputs):
            data.update(node.outputs)
        layer = _layer_of(node)
        for value in node.outputs if layer is not None else ():
            if value in data and any(_layer_of(user) != layer for user, _ in value.uses()):
                handed.setdefault(layer, []).append(value)
    if sorted(handed) != list(range(num_layers)) or any(len(values) != 1 for values in handed.values()):
        return False
    for layer, (value,) in handed.items():
        value.name = names.HIDDEN_STATES % (layer + 1)
    return True


def _layer_of(node) -> int | None:
    """The decoder layer a node was exported from (the last `layers.<i>` in its name scopes), or None."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    layers = [int(m.group(1)) for scope in ast.literal_eval(scopes) if (m := _LAYER_SCOPE.search(scope))] \
        if scopes else []
    return layers[-1] if layers else None


def _rename_dims(values, mapping: dict[str, str]) -> None:
    """Give the exporter's generated dimension names (`u0`, `past + sequence`) their canonical names."""
    import onnx_ir as ir

    for value in values:
        dims = [ir.SymbolicDim(mapping.get(dim.value, dim.value)) if isinstance(dim, ir.SymbolicDim) else dim
                for dim in value.shape]
        value.shape = ir.Shape(dims)


def _tensor_spec(value) -> TensorSpec:
    shape = [dim if isinstance(dim, int) else str(dim.value) for dim in value.shape]
    return TensorSpec(value.name, np.dtype(value.dtype.numpy()).name, shape)
