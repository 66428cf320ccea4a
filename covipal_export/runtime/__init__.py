"""The runtime: an export directory answering questions about images, on the best backend present.

    export_dir.py     open a directory (manifest + checksums) and rebuild its prompt processor
    backend.py        the stage interface every backend implements, and ONNX Runtime (CPU / CUDA, KV in OrtValues)
    torch_backend.py  the PyTorch reference behind the same interface (rebuilds the model from the registry)
    trt_backend.py    TensorRT engines (DIR/trt) on torch CUDA tensors, the KV cache kept on the GPU
    selection.py      which backends are usable here, and what `auto` picks and why
    pipeline.py       `Pipeline`: preprocessing -> vision -> prune -> splice -> prefill -> decode loop, with stats
    cli.py            `python run_trt.py IMAGE QUESTION`
"""

from covipal_export.runtime.pipeline import GenerationResult, GenerationStream, Pipeline, Timings

__all__ = ["GenerationResult", "GenerationStream", "Pipeline", "Timings"]
