"""The TopK-gather plugin: one fused op for keep-top-k in the PPM engine (`--gather plugin`, full TensorRT only).

Shared by build (the parser creates the plugin while it builds) and the runtime (it registers the plugin
before it deserializes such an engine); the graph surgery that puts the node into ppm.onnx is build's
(`covipal_export.build.plugin_graph`).

    spec.py       the op's contract: names, fields, output shapes and types (plain Python)
    kernel.py     its computation in torch, the same on the CPU and in CUDA
    trt_plugin.py the TensorRT IPluginV3 that runs the kernel, and its registration
"""
