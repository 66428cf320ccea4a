"""Export one graph: `torch.onnx.export(dynamo=True)` on an `OnnxSpec`, then describe what was written.

Why the dynamo exporter: it keeps the runtime budget as a data-dependent TopK size, gives the
dynamic dimensions the names of their `Dim`s, emits about a third of the legacy exporter's nodes
(native LayerNormalization and Gelu, no Shape/Gather chains) and the legacy TorchScript exporter is
deprecated. Opsets 18-20 only: opset 23 emits the ONNX `Attention` op, which TensorRT cannot build.
"""

from __future__ import annotations

import contextlib
import logging
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


def export_graph(spec: OnnxSpec, directory: Path, opset: int) -> GraphSpec:
    """Write `directory/<graph file>` (weights in `<graph file>.data` past 2 GB) and return its spec."""
    path = Path(directory) / names.graph_file(spec.stage)
    with quiet_exporter():
        program = torch.onnx.export(
            spec.module.eval(), spec.args, dynamo=True, opset_version=opset, verbose=False,
            input_names=spec.input_names, output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes,
        )
        graph = program.model.graph
        _rename_dims([*graph.inputs, *graph.outputs], spec.dim_names)
        program.save(path)  # external data when the initializers pass 2 GB
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
