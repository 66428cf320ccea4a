"""The TopK-gather plugin: one fused op for keep-top-k in the PPM engine (`--gather plugin`, full TensorRT only).

    spec.py       the op's contract: names, fields, output shapes and types (plain Python)
    kernel.py     its computation in torch, the same on the CPU and in CUDA
    onnx_node.py  the graph surgery: ppm.onnx's TopK/Gather subgraph -> one custom-domain node
    trt_plugin.py the TensorRT IPluginV3 that runs the kernel, and its registration
"""
