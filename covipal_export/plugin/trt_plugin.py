"""The TopK-gather TensorRT plugin: a Python IPluginV3 whose enqueue runs `kernel.topk_gather_into` with torch.

    plugin_classes(trt) -> (TopKGatherPlugin, TopKGatherCreator), defined over a TensorRT module
    register_plugin(trt)   puts the creator into trt's plugin registry (before parsing a plugin graph
                           or deserializing its engine); full TensorRT only

The build-time methods (types, shapes, formats, fields) delegate to `spec.py` and run on the CPU;
enqueue wraps TensorRT's device buffers as torch tensors (CUDA array interface, no copy) and runs
on TensorRT's stream. The budget is a shape input (see spec.py), so output sizes are fixed before
enqueue and the engine's outputs are allocated up front, as with the standard-op graph.
"""

from __future__ import annotations

from types import ModuleType

from covipal.errors import CovipalError
from covipal_export.plugin import spec
from covipal_export.plugin.kernel import topk_gather_into

_TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "INT64": "<i8"}  # CUDA array interface type strings
_REGISTERED: dict[str, object] = {}  # module name -> its registered creator, kept alive here


class _DeviceArray:
    """A TensorRT device buffer seen through the CUDA array interface (torch.as_tensor wraps it without a copy)."""

    def __init__(self, pointer: int, desc):
        self.__cuda_array_interface__ = {"shape": tuple(desc.dims), "typestr": _TYPESTR[desc.type.name],
                                         "data": (pointer, False), "version": 3}


def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """The plugin and creator classes over `trt` (their Python methods are callable without a GPU)."""

    class ExprOps:
        """`spec.DimOps` on TensorRT's dimension expressions."""

        def __init__(self, builder):
            self.builder = builder

        def constant(self, value: int):
            return self.builder.constant(value)

        def min(self, a, b):
            return self.builder.operation(trt.DimensionOperation.MIN, a, b)

        def max(self, a, b):
            return self.builder.operation(trt.DimensionOperation.MAX, a, b)

    class TopKGatherPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """scores [B, N], tokens [B, N, D] (+ budget as a shape input) -> kept_tokens [B, k, D], kept_index [B, k]."""

        def __init__(self, fields: spec.TopKGatherFields):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.fields = fields
            self.num_outputs = spec.NUM_OUTPUTS
            self.plugin_name = spec.OP_TYPE
            self.plugin_version = spec.PLUGIN_VERSION
            self.plugin_namespace = spec.PLUGIN_NAMESPACE

        def get_capability_interface(self, type):
            return self

        def clone(self):
            return TopKGatherPlugin(self.fields)

        def get_output_data_types(self, input_types):
            return [getattr(trt.DataType, name) for name in spec.output_types([t.name for t in input_types])]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            budget = shape_inputs[0][0]  # the value of the 0-d budget shape tensor
            shapes = spec.output_shapes(list(inputs[0]), list(inputs[1]), budget, self.fields, ExprOps(expr_builder))
            return [trt.DimsExprs(dims) for dims in shapes]

        def supports_format_combination(self, pos, in_out, num_inputs):
            return (in_out[pos].desc.format == trt.TensorFormat.LINEAR
                    and spec.supports_types(pos, [d.desc.type.name for d in in_out[:pos + 1]]))

        def configure_plugin(self, inp, out):
            """Nothing to choose: one algorithm for every shape and type."""

        def on_shape_change(self, inp, out):
            spec.check_shapes(list(inp[0].dims), list(inp[1].dims), self.fields)

        def set_tactic(self, tactic):
            """The default tactic only (no custom tactics are advertised)."""

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([trt.PluginField(name, array, trt.PluginFieldType.INT32)
                                              for name, array in self.fields.to_arrays().items()])

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            scores, tokens = (torch.as_tensor(_DeviceArray(p, d), device="cuda") for p, d in zip(inputs, input_desc))
            kept_tokens, kept_index = (torch.as_tensor(_DeviceArray(p, d), device="cuda")
                                       for p, d in zip(outputs, output_desc))
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                topk_gather_into(scores, tokens, kept_tokens, kept_index)

    class TopKGatherCreator(trt.IPluginCreatorV3One):
        """Makes TopKGather plugins from ONNX attributes (build) or serialized fields (runtime)."""

        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = spec.OP_TYPE
            self.plugin_version = spec.PLUGIN_VERSION
            self.plugin_namespace = spec.PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField(name, array, trt.PluginFieldType.INT32)
                for name, array in spec.TopKGatherFields(1, 1).to_arrays().items()])

        def create_plugin(self, name, field_collection, phase):
            return TopKGatherPlugin(spec.TopKGatherFields.from_arrays({f.name: f.data for f in field_collection}))

    return TopKGatherPlugin, TopKGatherCreator


def register_plugin(trt: ModuleType) -> None:
    """Register the TopKGather creator with `trt` (once per process). TensorRT-RTX is refused: it cannot take it."""
    if trt.__name__ == "tensorrt_rtx":
        raise CovipalError("TensorRT-RTX cannot take custom plugins; the TopKGather plugin needs full TensorRT")
    if trt.__name__ in _REGISTERED:
        return
    _, creator_class = plugin_classes(trt)
    creator = creator_class()
    if not trt.get_plugin_registry().register_creator(creator, spec.PLUGIN_NAMESPACE):
        raise CovipalError(f"TensorRT refused to register the {spec.OP_TYPE} plugin creator")
    _REGISTERED[trt.__name__] = creator
