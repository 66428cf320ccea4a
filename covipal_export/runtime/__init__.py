"""The runtime: an export directory answering questions about images, on the best backend present.

Reads nothing about a model but the directory's manifest, and imports nothing from export/ or build/
(no onnx, onnxscript or torch.onnx; ONNX Runtime, TensorRT and torch only).

    export_dir.py     find and open a directory (manifest + checksums) and rebuild its prompt processor
    backend.py        the stage interface every backend implements; what the graph backends share
    ort_backend.py    ONNX Runtime (CPU / CUDA), the KV cache in OrtValues
    trt_backend.py    TensorRT engines (DIR/trt) on torch CUDA tensors, the KV cache kept on the GPU
    torch_backend.py  the PyTorch reference behind the same interface
    compressed_kv.py  a KV cache compressed per layer and head on the host, read by decoder_kv.onnx (--kv-variant)
    reference.py      the PyTorch model and strategy of a directory, rebuilt from the covipal registry
    selection.py      which backends are usable here, and what `auto` picks and why
    pipeline.py       `Pipeline`: preprocessing -> vision -> prune -> splice -> prefill -> the decode loop, timed
    lru.py            the map both caches are: bounded in bytes, least recently used out, shared by threads
    vision_cache.py   visual tokens by frame content: the encoder runs once per frame
    prefix_cache.py   the decoder KV of the text before the image + the kept visual tokens, by frame and selection:
                      more questions about a frame prefill only their own text
    cli.py            `python run_trt.py IMAGE QUESTION` (also `covipal-run`)
"""

from covipal_export.runtime.pipeline import GenerationResult, GenerationStream, Pipeline, Timings

__all__ = ["GenerationResult", "GenerationStream", "Pipeline", "Timings"]
