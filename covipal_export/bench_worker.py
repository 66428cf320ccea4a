"""One backend in its own process, timing one (image, question) call per request of the benchmark.

Each backend runs in a separate process so that its host memory (weights, sessions, KV cache) is its
own: the peak RSS of a call is the process's high-water mark over that call, reset before it
(Linux `/proc/self/clear_refs`), so it includes the resident weights and whatever the call adds.

A call, timed stage by stage (milliseconds):

    preprocess   tokenizer + chat template + image preprocessing (0 for synthetic prompts)
    vision       encode_images(pixel_values [1, 3, S, S])            -> visual [1, N, D]
    prune        embed + PPM scoring + keep-top-k + splice           -> inputs_embeds [1, L-N+k, D]
    prefill      decoder over the pruned prompt                      -> logits [1, V]
    ttft         all of the above + the first token (from the start of the call)
    decode       mean of `new_tokens - 1` single-token steps; EOS is ignored so every call decodes the same count
    ppm_select   PPM scoring + keep-top-k alone, timed again after the call on the same inputs
"""

from __future__ import annotations

import ctypes
import resource
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from covipal.errors import CovipalError
from covipal_export.manifest import Manifest
from covipal_export.runtime.backend import Backend, OrtBackend

BACKEND_NAMES = ("torch", "ort", "trt")


@dataclass
class WorkerSpec:
    """What one worker process runs."""

    directory: str  # the export directory
    backend: str  # one of BACKEND_NAMES
    threads: int  # torch threads and ONNX Runtime intra-op threads
    image: str
    question: str
    text_tokens: int  # non-image prompt tokens of a synthetic prompt (exports without a tokenizer)
    new_tokens: int  # tokens generated per call (the first one included)
    position_policy: str | None  # None: the manifest's


def serve(conn: Connection, spec: WorkerSpec) -> None:
    """Process entry: open the backend, answer ("ready", info), then one ("ok", timings) per budget until None.

    A CovipalError (e.g. TensorRT missing) is sent as ("error", message); anything else as ("bug", traceback).
    """
    try:
        worker = Worker(spec)
        conn.send(("ready", worker.info))
        while (budget := conn.recv()) is not None:
            conn.send(("ok", worker.measure(budget)))
    except CovipalError as exc:
        conn.send(("error", str(exc)))
    except Exception:  # a bug: the parent raises it with this traceback
        conn.send(("bug", traceback.format_exc()))


class Worker:
    def __init__(self, spec: WorkerSpec):
        import torch

        from covipal.cli import quiet_libraries
        from covipal_export.runtime.export_dir import open_export

        torch.set_num_threads(spec.threads)
        quiet_libraries()
        start = time.perf_counter()
        self.spec, self.directory = spec, Path(spec.directory)
        self.manifest = open_export(self.directory, check_files=False)  # the parent checked the files
        self.backend, reason = open_backend(self.directory, self.manifest, spec.backend, spec.threads)
        self.prompt = PromptSource(self.directory, self.manifest, spec)
        self.memory = PeakMemory()
        self.info = {"backend": self.backend.name, "reason": reason, "load_s": round(time.perf_counter() - start, 1),
                     "rss_mb": round(self.memory.rss_mb(), 1), "peak_mode": self.memory.mode,
                     "prompt_length": self.prompt.length, "text_tokens": self.prompt.length - self.prompt.num_visual}

    def measure(self, budget: int) -> dict[str, float]:
        """One timed call at `budget` (see the module docstring)."""
        backend, spec = self.backend, self.spec
        policy = spec.position_policy or self.manifest.pruning.position_policy
        self.memory.reset()
        start = time.perf_counter()
        input_ids, attention_mask, pixel_values = self.prompt()  # [1, L], [1, L], [1, 3, S, S]
        preprocess, mark = _ms(start), time.perf_counter()
        visual = backend.encode_images(pixel_values)  # [1, N, D]
        vision, mark = _ms(mark), time.perf_counter()
        prompt = backend.prune(input_ids, attention_mask, visual, budget, policy)
        prune, mark = _ms(mark), time.perf_counter()
        logits = backend.prefill(prompt)  # [1, V]
        prefill = _ms(mark)
        token = logits.argmax(-1)  # [1]
        ttft = _ms(start)
        mask, position = prompt.attention_mask, prompt.position_ids[:, -1:] + 1  # [1, P], [1, 1]
        steps = []
        for _ in range(spec.new_tokens - 1):
            mark = time.perf_counter()
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)  # [1, P+1]
            token = backend.step(token, mask, position).argmax(-1)
            steps.append(_ms(mark))
            position = position + 1
        peak = self.memory.peak_mb()
        return {"preprocess_ms": preprocess, "vision_ms": vision, "prune_ms": prune, "prefill_ms": prefill,
                "ttft_ms": ttft, "decode_ms_per_token": float(np.mean(steps)) if steps else 0.0,
                "ppm_select_ms": time_selection(backend, input_ids, attention_mask, visual, budget),
                "peak_mem_mb": peak, "device_mem_mb": device_memory_mb() if _on_gpu(backend) else None,
                "tokens_kept": int(prompt.kept_index.shape[1]), "prefill_length": int(prompt.inputs_embeds.shape[1])}


def open_backend(directory: Path, manifest: Manifest, name: str, threads: int) -> tuple[Backend, str]:
    """torch: the PyTorch reference (eager); ort: ONNX Runtime (CUDA when a probe gets it) with `threads`;
    trt: whatever the runtime's selection gives, or its one-line error."""
    from covipal_export.runtime.selection import CUDA, choose_backend, ort_cuda_missing

    if name == "torch":
        from covipal_export.runtime.torch_backend import TorchBackend

        return TorchBackend(manifest), "PyTorch eager, the covipal reference"
    if name == "ort":
        no_cuda = ort_cuda_missing(directory, manifest)
        if no_cuda is None:
            return OrtBackend(directory, manifest, CUDA, threads=threads), "ONNX Runtime on CUDA"
        return OrtBackend(directory, manifest, threads=threads), f"ONNX Runtime on CPU ({no_cuda})"
    return choose_backend(directory, manifest, name)


class PromptSource:
    """The benchmark's prompt: the real question through the export's tokenizer and preprocessing, or, for an
    export without them (random-weight LLaVA without a cached tokenizer), a seeded synthetic prompt of the
    LLaVA-1.5 layout [BOS, 4 prefix ids, N image tokens, text_tokens - 5 suffix ids] and seeded pixels."""

    def __init__(self, directory: Path, manifest: Manifest, spec: WorkerSpec):
        from covipal.models.processing import load_image
        from covipal_export.runtime.export_dir import prompt_processor

        model = manifest.model
        self.num_visual = model.num_visual_tokens
        self.processor = None
        if manifest.tokenizer is not None and manifest.preprocessing is not None:
            self.processor = prompt_processor(directory, manifest)
            self.image = load_image(spec.image)
            self.question = spec.question
            self.length = int(self.processor([self.image], [self.question]).input_ids.shape[1])
            return
        if spec.text_tokens < 6:
            raise CovipalError(f"a synthetic prompt needs at least 6 text tokens, got {spec.text_tokens}")
        rng = np.random.default_rng(0)
        special = manifest.special_tokens
        reserved = {special.image, special.pad, *special.eos} | ({special.bos} if special.bos is not None else set())
        pool = np.setdiff1d(np.arange(model.vocab_size), list(reserved))
        text = rng.choice(pool, spec.text_tokens - 1)
        bos = special.bos if special.bos is not None else int(text[0])
        ids = np.concatenate([[bos], text[:4], np.full(self.num_visual, special.image), text[4:]])
        self.input_ids = ids[None].astype(np.int64)  # [1, L]
        self.pixel_values = rng.standard_normal((1, 3, model.image_size, model.image_size)).astype(np.float32)
        self.length = self.input_ids.shape[1]

    def __call__(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids [1, L], attention_mask [1, L], pixel_values [1, 3, S, S]."""
        if self.processor is None:
            return self.input_ids, np.ones_like(self.input_ids), self.pixel_values
        batch = self.processor([self.image], [self.question])
        return batch.input_ids.numpy(), batch.attention_mask.numpy(), batch.pixel_values.numpy()


def time_selection(backend: Backend, input_ids: np.ndarray, attention_mask: np.ndarray, visual: np.ndarray,
                   budget: int) -> float | None:
    """Milliseconds of PPM scoring + keep-top-k (+ gather of the kept tokens in the pruning graph) alone;
    None for a backend whose pruning stage cannot be run on its own here.

    ONNX Runtime and TensorRT run the graphs through an `OrtChain` (`backend.chain`); torch runs the strategy.
    """
    from covipal_export.ort_chain import OrtChain

    chain = getattr(backend, "chain", None)
    if isinstance(chain, OrtChain):
        from covipal_export.ort_chain import text_for_scoring

        image_id = chain.manifest.model.image_token_id
        embeds = chain.embed(np.where(input_ids == image_id, 0, input_ids))  # [1, L, D]
        text_embeds, text_mask = text_for_scoring(embeds, input_ids, attention_mask, image_id)  # [1, T, D], [1, T]
        mark = time.perf_counter()
        chain.prune(visual, text_embeds, text_mask, budget)
        return _ms(mark)
    from covipal_export.runtime.torch_backend import TorchBackend

    if isinstance(backend, TorchBackend):
        import torch

        from covipal.pruning import text_for_scoring
        from covipal.selection import keep_topk_in_order

        model, ids = backend.model, torch.from_numpy(input_ids)
        with torch.inference_mode():
            text_embeds, text_mask = text_for_scoring(model.embed_prompt(ids), ids, torch.from_numpy(attention_mask),
                                                      model.image_token_id)
            tokens = torch.from_numpy(visual)
            mark = time.perf_counter()
            keep_topk_in_order(backend.strategy.scores(tokens, text_embeds, text_mask, budget), budget)
            return _ms(mark)
    return None


class PeakMemory:
    """This process's peak resident memory over a window: VmHWM after resetting it through
    /proc/self/clear_refs (Linux >= 4.0); where that is refused, the peak since the process started."""

    def __init__(self):
        self.mode = "per call" if self.reset() else "since process start"

    def reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_mb(self) -> float:
        if self.mode == "per call":
            return _status_kib("VmHWM") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def rss_mb(self) -> float:
        return _status_kib("VmRSS") / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise CovipalError(f"/proc/self/status has no {field}")


def _on_gpu(backend: Backend) -> bool:
    """ONNX Runtime on CUDA, or TensorRT (`tensorrt`, `tensorrt-rtx`: always a GPU)."""
    return getattr(backend, "device", "cpu") != "cpu" or backend.name.startswith("tensorrt")


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_device(index: int) -> tuple[ctypes.CDLL, ctypes.c_void_p] | None:
    """NVML and the handle of GPU `index` (NVML's numbering), or None without a driver or GPU."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    handle = ctypes.c_void_p()
    if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        return None
    return nvml, handle


def device_name(index: int = 0) -> str | None:
    found = _nvml_device(index)
    if found is None:
        return None
    name = ctypes.create_string_buffer(96)
    return name.value.decode() if found[0].nvmlDeviceGetName(found[1], name, 96) == 0 else None


def device_memory_mb(index: int = 0) -> float | None:
    """Memory in use on GPU `index` right now (the whole device, all processes; NVML has no peak)."""
    found, memory = _nvml_device(index), _NvmlMemory()
    if found is None or found[0].nvmlDeviceGetMemoryInfo(found[1], ctypes.byref(memory)) != 0:
        return None
    return memory.used / 2**20


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0
