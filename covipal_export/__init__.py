"""Deployment of covipal models: ONNX export, TensorRT engines and the runtime `Pipeline`.

Builds on `covipal` (never the reverse). Only the package skeleton exists so far: the export,
engine and runtime stages are delivered by their own issues.
"""

__version__ = "0.1.0"
