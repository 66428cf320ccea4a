"""Which backends are usable on this machine, and what `auto` picks and why.

    auto   TensorRT when DIR/trt has engines, a GPU is usable from torch and the module that built them imports
           (and loads them), else ONNX Runtime CUDA when onnxruntime-gpu really runs on a GPU, else ONNX Runtime
           CPU; `reason` says what it picked and, for TensorRT, what was missing.
    trt    TensorRT, or a one-line error saying exactly what is missing (engines, a GPU, torch CUDA, the module).
    ort    ONNX Runtime, CUDA when usable, else CPU.
    torch  the PyTorch reference (rebuilds the model from the covipal registry); refused for a quantized decoder.

The provider list is not trusted: onnxruntime-gpu lists CUDA on machines without a GPU, so CUDA is
probed by creating a session and reading back the providers it actually got.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import onnxruntime as ort
import torch

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.engine_info import engine_path, import_tensorrt, read_engine_info
from covipal_export.manifest import Manifest
from covipal_export.runtime.backend import Backend
from covipal_export.runtime.ort_backend import CUDA, OrtBackend, new_session
from covipal_export.runtime.trt_backend import TrtBackend

BACKENDS = ("auto", "trt", "ort", "torch")


def cuda_device_count() -> int:
    """NVIDIA GPUs the driver reports (0 without a driver), without importing a framework."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def tensorrt_missing(directory: Path) -> str | None:
    """Why the engines of `directory` cannot run here (the first thing missing), or None when they can be loaded."""
    engine_dir = directory / names.ENGINE_DIR
    files = [path for stage in names.STAGES
             for path in (engine_path(directory, stage), engine_path(directory, stage).with_suffix(".engine.json"))]
    if not all(path.is_file() for path in files):
        return f"no TensorRT engines in {engine_dir} (build them with `python -m covipal_export.build {directory}`)"
    if cuda_device_count() == 0:
        return "no NVIDIA GPU is usable (TensorRT engines run on a GPU only)"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} cannot use the GPU (the engines' buffers are torch CUDA tensors; "
                f"install a CUDA build of torch)")
    for module in sorted({read_engine_info(directory, stage).module for stage in names.STAGES}):
        try:
            import_tensorrt(module)
        except CovipalError as error:
            return f"the engines were built by {module}: {error}"
    return None


def ort_cuda_missing(directory: Path, manifest: Manifest) -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None when a probe session really got CUDA."""
    if CUDA not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if cuda_device_count() == 0:
        return "onnxruntime-gpu is installed but no NVIDIA GPU is usable"
    probe = new_session(manifest.graph_path(directory, names.EMBED), [CUDA, "CPUExecutionProvider"])
    if probe.get_providers()[0] != CUDA:
        return "onnxruntime-gpu could not create a CUDA session (driver or CUDA libraries missing)"
    return None


def choose_backend(directory: Path, manifest: Manifest, requested: str,
                   threads: int | None = None) -> tuple[Backend, str]:
    """The backend to run `directory` with, and a one-line reason for the choice.

    threads: ONNX Runtime's intra-op threads (None: its default, one per physical core).
    """
    if requested not in BACKENDS:
        raise CovipalError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
    if requested == "torch":
        if manifest.quantization is not None:
            raise CovipalError(f"--backend torch rebuilds the PyTorch model with its {manifest.model.dtype} weights, "
                               f"not this export's decoder ({manifest.quantization.summary()}); use --backend ort "
                               f"or trt")
        from covipal_export.runtime.torch_backend import TorchBackend  # torch and the registry only when asked

        return TorchBackend(manifest), "requested: the PyTorch reference, rebuilt from the covipal registry"
    if requested in ("auto", "trt"):
        no_trt = tensorrt_missing(directory)
        if no_trt is None:
            try:
                backend = TrtBackend(directory, manifest)
            except CovipalError as error:  # an engine from another TensorRT or GPU: says how to rebuild
                if requested == "trt":
                    raise
                no_trt = str(error)
            else:
                why = "requested TensorRT" if requested == "trt" else "engines, TensorRT and a GPU are present"
                return backend, f"{why}; {backend.name} engines from {directory / names.ENGINE_DIR}"
        if requested == "trt":
            raise CovipalError(f"--backend trt is not available: {no_trt}; use --backend ort")
    no_cuda = ort_cuda_missing(directory, manifest)
    why = "requested ONNX Runtime" if requested == "ort" else f"TensorRT not used: {no_trt}"
    if no_cuda is None:
        return OrtBackend(directory, manifest, CUDA, threads), f"{why}; ONNX Runtime on CUDA"
    return OrtBackend(directory, manifest, threads=threads), f"{why}; ONNX Runtime on CPU: {no_cuda}"
