"""Build: TensorRT engines from an export directory's graphs and manifest (imports nothing from the runtime).

    engines.py       one engine per graph: parse, check against the manifest, profiles, build, metadata
    plugin_graph.py  ppm.onnx with its keep-top-k swapped for the TopKGather plugin node (--gather plugin)
    cli.py           `python -m covipal_export.build DIR` (also `covipal-build`), and the flags export.py --trt shares
"""
