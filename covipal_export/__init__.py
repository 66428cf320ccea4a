"""Deployment of covipal models: ONNX export, TensorRT engines, the runtime and the benchmarks.

Builds on `covipal` (never the reverse). One folder per stage; one export directory (four ONNX
graphs + `manifest.json`) is the contract between them:

    names.py, manifest.py   the shared contract: stage, file and tensor names; the manifest and its strict loader
    records.py              dataclasses as JSON files, read strictly (the manifest, the engine metadata)
    engine_info.py          trt/<stage>.engine.json: written by build, checked by the runtime
    plugin/                 the TopKGather TensorRT plugin, shared by build and runtime
    export/                 model -> graphs + manifest, verified against PyTorch (`python export.py`)
    build/                  graphs -> TensorRT engines (`python -m covipal_export.build DIR`)
    runtime/                `Pipeline` (also `covipal_export.Pipeline`) and `python run_trt.py`; imports no
                            export or build code
    bench/                  latency and memory per backend and budget, and easy-VQA accuracy of an export
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`covipal_export.Pipeline`, imported on first use (export alone does not load the runtime)."""
    if name == "Pipeline":
        from covipal_export.runtime import Pipeline

        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
