"""Which backends are usable on this machine, and what `auto` picks and why.

    auto   TensorRT (once engines can be run: not yet), else ONNX Runtime CUDA when onnxruntime-gpu really
           runs on a GPU, else ONNX Runtime CPU; `reason` says why.
    trt    a one-line error saying what is missing (module `tensorrt`, a GPU, the engine runner).
    ort    ONNX Runtime, CUDA when usable, else CPU.
    torch  the PyTorch reference (rebuilds the model from the covipal registry).

The provider list is not trusted: onnxruntime-gpu lists CUDA on machines without a GPU, so CUDA is
probed by creating a session and reading back the providers it actually got.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import onnxruntime as ort

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.manifest import Manifest
from covipal_export.ort_chain import new_session
from covipal_export.runtime.backend import Backend, OrtBackend

BACKENDS = ("auto", "trt", "ort", "torch")
CUDA = "CUDAExecutionProvider"


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


def tensorrt_missing() -> str:
    """Why TensorRT cannot run here: what is missing first, and the engine runner comes in a later change."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the TensorRT Python module `tensorrt` is not installed"
    if cuda_device_count() == 0:
        return "no NVIDIA GPU is usable (TensorRT engines run on a GPU only)"
    return "running TensorRT engines is not implemented yet in this runtime"


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


def choose_backend(directory: Path, manifest: Manifest, requested: str) -> tuple[Backend, str]:
    """The backend to run `directory` with, and a one-line reason for the choice."""
    if requested not in BACKENDS:
        raise CovipalError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
    if requested == "torch":
        from covipal_export.runtime.torch_backend import TorchBackend  # torch and the registry only when asked

        return TorchBackend(manifest), "requested: the PyTorch reference, rebuilt from the covipal registry"
    no_trt = tensorrt_missing()
    if requested == "trt":
        raise CovipalError(f"--backend trt is not available: {no_trt}; use --backend ort")
    no_cuda = ort_cuda_missing(directory, manifest)
    why = "requested ONNX Runtime" if requested == "ort" else f"TensorRT not used: {no_trt}"
    if no_cuda is None:
        return OrtBackend(directory, manifest, CUDA), f"{why}; ONNX Runtime on CUDA"
    return OrtBackend(directory, manifest), f"{why}; ONNX Runtime on CPU: {no_cuda}"
