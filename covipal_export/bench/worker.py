"""One backend in its own process, timing one (image, question) call per request of the benchmark.

Each backend runs in a separate process so that its host memory (weights, sessions, KV cache) is its
own: the peak RSS of a call is the process's high-water mark over that call, reset before it
(Linux `/proc/self/clear_refs`), so it includes the resident weights and whatever the call adds.

A call is one `Pipeline.generate` (the runtime users ship) with `ignore_eos=True`, so that every call
decodes the same count; its stage timings (milliseconds) are the Pipeline's own:

    preprocess   tokenizer + chat template + image preprocessing (0 for synthetic prompts)
    vision       encode_images(pixel_values [1, 3, S, S])            -> visual [1, N, D]
    prune        embed + PPM scoring + keep-top-k + splice           -> inputs_embeds [1, L-N+k, D]
    prefill      decoder over the pruned prompt                      -> logits [1, V]
    ttft         all of the above + the first token (from the start of the call)
    decode       mean of `new_tokens - 1` single-token steps
    ppm_select   PPM scoring + keep-top-k alone (the backend's selector), timed again on the same inputs; also
                 at k = N, where the call itself scores nothing, as what the PPM would cost there
"""

from __future__ import annotations

import ctypes
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from covipal.errors import CovipalError
from covipal.models.processing import PromptBatch
from covipal_export.manifest import Manifest
from covipal_export.memory import PeakMemory
from covipal_export.runtime.backend import Backend
from covipal_export.runtime.pipeline import GenerationResult, Pipeline

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
        from covipal.cli import quiet_libraries
        from covipal_export.runtime.export_dir import open_export, prompt_processor
        from covipal_export.runtime.selection import choose_backend

        torch.set_num_threads(spec.threads)
        quiet_libraries()
        start = time.perf_counter()
        self.spec, self.directory = spec, Path(spec.directory)
        manifest = open_export(self.directory, check_files=False)  # the parent checked the files
        backend, reason = choose_backend(self.directory, manifest, spec.backend, spec.threads)
        self.pipe = Pipeline(self.directory, manifest, prompt_processor(self.directory, manifest), backend, reason,
                             vision_cache_mb=0, prefix_cache_mb=0)  # every call timed with every stage
        self.prompt = PromptSource(manifest, self.pipe, spec)
        self.selection_inputs = selection_inputs(backend, self.prompt.batch())  # for timing the selection alone
        self.memory = PeakMemory()
        self.info = {"backend": backend.name, "reason": reason, "load_s": round(time.perf_counter() - start, 1),
                     "rss_mb": round(self.memory.rss_mb(), 1), "peak_mode": self.memory.mode,
                     "prompt_length": self.prompt.length, "text_tokens": self.prompt.length - self.prompt.num_visual}

    def measure(self, budget: int) -> dict[str, float]:
        """One timed call at `budget` (see the module docstring)."""
        spec, backend = self.spec, self.pipe.backend
        self.memory.reset()
        result = self.prompt.generate(budget, spec.new_tokens, spec.position_policy)
        peak = self.memory.peak_mb()
        timings = result.timings_ms
        return {"preprocess_ms": timings.preprocess, "vision_ms": timings.vision, "prune_ms": timings.prune,
                "prefill_ms": timings.prefill, "ttft_ms": timings.ttft, "decode_ms_per_token": timings.decode_per_token,
                "ppm_select_ms": time_selection(backend, *self.selection_inputs, budget),
                "peak_mem_mb": peak, "device_mem_mb": device_memory_mb() if backend.device != "cpu" else None,
                "tokens_kept": result.tokens_kept, "prefill_length": result.prefill_length}


class PromptSource:
    """The benchmark's prompt: the real question through the export's tokenizer and preprocessing, or, for an
    export without them (random-weight LLaVA without a cached tokenizer), a seeded synthetic prompt of the
    LLaVA-1.5 layout [BOS, 4 prefix ids, N image tokens, text_tokens - 5 suffix ids] and seeded pixels."""

    def __init__(self, manifest: Manifest, pipe: Pipeline, spec: WorkerSpec):
        from covipal.models.processing import load_image

        model = manifest.model
        self.pipe, self.num_visual = pipe, model.num_visual_tokens
        self.synthetic: PromptBatch | None = None
        if pipe.has_processor:
            self.image, self.question = load_image(spec.image), spec.question
            self.length = int(pipe.processor([self.image], [self.question]).input_ids.shape[1])
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
        pixels = rng.standard_normal((1, 3, model.image_size, model.image_size)).astype(np.float32)
        self.synthetic = PromptBatch(torch.from_numpy(ids[None]).long(), torch.ones(1, len(ids), dtype=torch.long),
                                     torch.from_numpy(pixels))
        self.length = len(ids)

    def batch(self) -> PromptBatch:
        """input_ids [1, L], attention_mask [1, L], pixel_values [1, 3, S, S]."""
        return self.synthetic or self.pipe.processor([self.image], [self.question])

    def generate(self, budget: int, new_tokens: int, position_policy: str | None) -> GenerationResult:
        """One call through the Pipeline, decoding exactly `new_tokens` (EOS ignored)."""
        options = dict(budget=budget, max_new_tokens=new_tokens, position_policy=position_policy, ignore_eos=True)
        if self.synthetic is not None:
            return self.pipe.generate_from_batch(self.synthetic, **options)
        return self.pipe.generate(self.image, self.question, **options)


def selection_inputs(backend: Backend, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the selector reads for this prompt: visual tokens [1, N, D], text_embeds [1, T, D], text_mask [1, T]."""
    from covipal.pruning import text_for_scoring

    with torch.inference_mode():
        visual = backend.encode_images(batch.pixel_values)
        embeds = backend.embed_prompt(batch.input_ids)
        text_embeds, text_mask = text_for_scoring(embeds, batch.input_ids, batch.attention_mask,
                                                  backend.manifest.model.image_token_id)
    return visual, text_embeds, text_mask


def time_selection(backend: Backend, visual: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                   budget: int) -> float:
    """Milliseconds of PPM scoring + keep-top-k (+ the gather of the kept tokens in the pruning graph) alone, by
    the backend's selector (the pruning graph or engine; the reference strategy for torch)."""
    with torch.inference_mode():
        mark = time.perf_counter()
        backend.selector.select(visual, text_embeds, text_mask, budget)
        return _ms(mark)


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
