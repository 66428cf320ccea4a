"""Graph surgery: replace ppm.onnx's keep-top-k subgraph by one `covipal::TopKGather` node.

    scores ─ TopK ─ TopK(ascending) ─ kept_index          scores ──────┐
    budget ─ Clip ─ ... (K)              │          ->    visual_tokens ├ TopKGather ─ kept_tokens, kept_index
    visual_tokens ─ GatherElements ─ kept_tokens          budget ──────┘

The graph's inputs and outputs keep their names, dtypes and shapes, so the manifest describes both
variants. Only TensorRT builds get this variant (written beside the engines); ONNX Runtime and the
manifest keep the standard graph.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.plugin.spec import (
    BUDGET_INPUT,
    DOMAIN,
    DOMAIN_VERSION,
    OP_TYPE,
    SHAPE_INPUTS_ATTRIBUTE,
    TopKGatherFields,
)

PLUGIN_SUFFIX = ".plugin.onnx"  # ppm.onnx -> ppm.plugin.onnx


def topk_subgraph(sources: set[str], results: list[gs.Variable]) -> list[gs.Node]:
    """The nodes between `sources` (tensor names) and `results`, walking back from the results' producers."""
    found: dict[int, gs.Node] = {}
    stack = list(results)
    while stack:
        tensor = stack.pop()
        if tensor.name in sources or isinstance(tensor, gs.Constant):
            continue
        if not tensor.inputs:  # a graph input that is not a source
            raise CovipalError(f"{names.GRAPH_FILES[names.PRUNE]}: the keep-top-k subgraph reads {tensor.name!r}, "
                               f"not only {sorted(sources)}")
        node = tensor.inputs[0]
        if id(node) not in found:
            found[id(node)] = node
            stack.extend(node.inputs)
    return list(found.values())


def swap_topk_gather(model: onnx.ModelProto) -> onnx.ModelProto:
    """ppm.onnx with its TopK/Gather keep-top-k subgraph replaced by one TopKGather node."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    inputs = [tensors[name] for name in (names.SCORES, names.VISUAL_TOKENS, names.BUDGET)]
    outputs = [tensors[name] for name in (names.KEPT_TOKENS, names.KEPT_INDEX)]
    subgraph = topk_subgraph({t.name for t in inputs}, outputs)
    if not any(node.op == "TopK" for node in subgraph):
        raise CovipalError(f"{names.GRAPH_FILES[names.PRUNE]} has no TopK between the scores and the kept tokens; "
                           f"is it a ppm.onnx from export.py?")
    for node in subgraph:
        node.outputs.clear()  # detach: cleanup() removes whatever nothing reads any more
    num_tokens = tensors[names.VISUAL_TOKENS].shape[1]
    fields = TopKGatherFields(min_kept=1, max_kept=num_tokens)
    graph.nodes.append(gs.Node(op=OP_TYPE, name=OP_TYPE, domain=DOMAIN, inputs=inputs, outputs=outputs,
                               attrs={**asdict(fields), SHAPE_INPUTS_ATTRIBUTE: [BUDGET_INPUT]}))
    graph.cleanup().toposort()
    swapped = gs.export_onnx(graph)
    if not any(opset.domain == DOMAIN for opset in swapped.opset_import):
        swapped.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return swapped


def write_plugin_graph(source: Path, directory: Path) -> Path:
    """`directory/<source stem>.plugin.onnx`: the swapped copy of `source` (its external weights loaded)."""
    target = directory / (Path(source).stem + PLUGIN_SUFFIX)
    onnx.save(swap_topk_gather(onnx.load(str(source))), str(target))
    return target
