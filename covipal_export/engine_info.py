"""TensorRT engines as files: `DIR/trt/<stage>.engine` and the `<stage>.engine.json` beside it.

Build writes the metadata (`covipal_export.build.engines`); the runtime reads and checks it before it
loads an engine (`covipal_export.runtime.trt_backend`). Both go through this module:

    EngineInfo            what built an engine: stage, ONNX file and sha256, module and version, GPU target,
                          network I/O, optimization profile, gather kind
    write_engine_info     <stage>.engine.json
    read_engine_info      the strict loader (covipal_export.records): a missing file, bad JSON, or an
                          unknown, missing or mistyped key is one CovipalError line that says how to rebuild
    check_engine          refuses an engine made by another TensorRT or for another GPU
    import_tensorrt       `tensorrt` (full TensorRT) where it imports, else `tensorrt_rtx`
    gpu_target            this GPU as an engine records its target
    make_logger           a TensorRT logger that keeps the errors for our messages
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.records import read_record, write_record


@dataclass
class Profile:
    """min / opt / max of one input: a shape for tensors, the value for the `budget` shape input."""

    name: str
    min: list[int]
    opt: list[int]
    max: list[int]
    shape_input: bool = False


@dataclass
class TensorInfo:
    """An engine input or output as the parsed network sees it (-1 = a dynamic dimension)."""

    name: str
    dtype: str  # numpy's name
    shape: list[int]


@dataclass
class EngineInfo:
    """What built an engine (written as `<stage>.engine.json`)."""

    stage: str
    onnx_file: str
    onnx_sha256: str
    module: str  # "tensorrt" or "tensorrt_rtx"
    version: str
    target: str  # "sm89" (TensorRT-RTX ahead of time) or the GPU the full TensorRT built on
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    profiles: list[Profile]
    workspace_mb: int | None
    seconds: float
    gather: str = "native"  # "plugin": the PPM engine holds the TopKGather plugin (register it before loading)
    peak_rss_bytes: int | None = None  # the building process's resident high-water mark once this engine was built


def engine_path(directory: Path, stage: str) -> Path:
    return Path(directory) / names.ENGINE_DIR / f"{stage}.engine"


def rebuild_hint(directory: Path) -> str:
    return f"rebuild with `python -m covipal_export.build {directory}`"


def write_engine_info(info: EngineInfo, engine_dir: Path) -> Path:
    return write_record(info, Path(engine_dir) / f"{info.stage}.engine.json")


def read_engine_info(directory: Path, stage: str) -> EngineInfo:
    """The metadata of `directory/trt/<stage>.engine`, checked key by key."""
    path = engine_path(directory, stage).with_suffix(".engine.json")
    if not path.is_file():
        raise CovipalError(f"no TensorRT engine for {stage} in {directory}: build with "
                           f"`python -m covipal_export.build {directory}`")
    try:
        info = read_record(EngineInfo, path)
    except CovipalError as error:
        raise CovipalError(f"{error}; {rebuild_hint(directory)}") from None
    if info.stage != stage:
        raise CovipalError(f"{path} describes the {info.stage!r} engine, not {stage!r}; {rebuild_hint(directory)}")
    return info


def check_engine(info: EngineInfo, trt: ModuleType, target: str, directory: Path) -> None:
    """Refuse an engine built by another TensorRT or for another GPU, saying how to rebuild it."""
    if (info.module, info.version) != (trt.__name__, trt.__version__):
        raise CovipalError(f"{info.stage}.engine was built by {info.module} {info.version}, this is "
                           f"{trt.__name__} {trt.__version__}: {rebuild_hint(directory)}")
    if info.target != target:
        raise CovipalError(f"{info.stage}.engine was built for {info.target}, this GPU is {target}: "
                           f"{rebuild_hint(directory)}")


def import_tensorrt(prefer: str | None = None) -> ModuleType:
    """`tensorrt` where it imports, else `tensorrt_rtx`; `prefer` names one of them."""
    candidates = [prefer] if prefer else ["tensorrt", "tensorrt_rtx"]
    for name in candidates:
        try:
            return importlib.import_module(name)
        except (ImportError, OSError):  # the PyPI stub of full TensorRT imports without its libraries
            continue
    raise CovipalError(f"no TensorRT module ({' or '.join(candidates)}) can be imported: install full TensorRT "
                       f"(NVIDIA's index, or JetPack on Jetson) or `pip install tensorrt-rtx`")


def gpu_target(trt: ModuleType) -> str:
    """This GPU as an engine records its target: "sm89" (TensorRT-RTX), "NAME (sm89)" (full TensorRT)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    if trt.__name__ == "tensorrt_rtx":
        return f"sm{major}{minor}"
    return f"{torch.cuda.get_device_name()} (sm{major}{minor})"


def make_logger(trt: ModuleType):
    """A logger that keeps errors for our messages and drops the CUDA-driver noise of GPU-less builds."""

    class Logger(trt.ILogger):
        def __init__(self):
            super().__init__()
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity <= trt.ILogger.Severity.ERROR and "cudaError 35" not in message:
                self.errors.append(message)

    return Logger()
