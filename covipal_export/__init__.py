"""Deployment of covipal models: ONNX export, TensorRT engines and the runtime.

Builds on `covipal` (never the reverse). One export directory = four ONNX graphs + `manifest.json`:

    names.py        canonical stage, file, tensor and dimension names
    graphs.py       the export wrappers, sample inputs and dynamic shapes of each graph
    onnx_export.py  one graph through torch.onnx.export(dynamo=True)
    manifest.py     manifest.json: the contract between export and runtime, and its strict loader
    reference.py    the PyTorch model and strategy an export is made from (rebuilt from a manifest)
    exporter.py     export a model into a directory, atomically; export_cli.py is `python export.py`
    ort_chain.py    the graphs in ONNX Runtime: host-side splice and greedy decoding with the KV cache
    verify.py       stage-by-stage parity against PyTorch (`python -m covipal_export.verify DIR`)
    runtime/        `Pipeline` (also `covipal_export.Pipeline`) and `python run_trt.py`: backends, stats, CLI
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`covipal_export.Pipeline`, imported on first use (export alone does not load the runtime)."""
    if name == "Pipeline":
        from covipal_export.runtime import Pipeline

        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
