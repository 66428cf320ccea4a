"""`Pipeline`: an export directory answering questions about images, embeddable in an application.

    pipe = Pipeline.from_dir("engines/mini-llava-b100")            # manifest + checksums; backend "auto"
    result = pipe.generate("photo.png", "What is on the table?", budget=32)
    result.answer, result.tokens_kept, result.timings_ms.ttft
    for text in pipe.generate(image, question, stream=True): print(text, end="")
    pipe.generate(image, question, kv=KVConfig("eviction", 0.4))  # a compressed KV cache (--kv-variant exports)

Stages: preprocessing (tokenizer, chat template, image preprocessing: all from the directory) ->
vision (once per frame: `vision_cache`) -> embed -> prune (budget per call) -> splice -> prefill (the prefix
before the question's text once per frame and selection: `prefix_cache`) -> decode loop with the KV cache (or a
compressed one, `kv=`: the whole prompt is prefilled, the prefix cache is not used).
Batches are lists of (image, question) pairs, left-padded like `covipal.models.processing`.

Threads may share one Pipeline: each call keeps its own state (`_Run`: timings, tokens, the KV cache the
backend returns); ONNX Runtime sessions and the PyTorch model run concurrent calls, TensorRT calls to one
engine take turns (one execution context each), and the tokenizer takes one caller at a time.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from covipal.budget import Budget, resolve_budget
from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, decode_loop
from covipal.kv_compression import KVConfig
from covipal.models.processing import ImageInput, PromptBatch, PromptProcessor
from covipal.pruning import PrunedPrompt, check_position_policy
from covipal_export.manifest import Manifest, QuantizationSpec
from covipal_export.runtime.backend import Backend, KVCache
from covipal_export.runtime.conversation import Conversation
from covipal_export.runtime.export_dir import open_export, prompt_processor
from covipal_export.runtime.lru import CacheCounts
from covipal_export.runtime.prefix_cache import DEFAULT_MB as PREFIX_MB
from covipal_export.runtime.prefix_cache import PrefixCache
from covipal_export.runtime.selection import choose_backend
from covipal_export.runtime.vision_cache import DEFAULT_MB as VISION_MB
from covipal_export.runtime.vision_cache import VisionCache, digest


@dataclass
class Timings:
    """Milliseconds per stage (ttft: from the call to the first token, preprocessing included); cache counts."""

    preprocess: float = 0.0
    vision: float = 0.0
    prune: float = 0.0  # embed + prune + splice
    prefill: float = 0.0
    ttft: float = 0.0
    decode_per_token: float = 0.0  # mean over the steps after the first token
    vision_cache_hits: int = 0  # images whose visual tokens came from the Pipeline's vision cache (a count)
    vision_cache_misses: int = 0  # images the vision encoder ran on (a count)
    prefix_cache_hits: int = 0  # prompts that prefilled only their text after the image, after a cached prefix KV
    prefix_cache_misses: int = 0  # prompts prefilled whole


@dataclass
class GenerationResult:
    answers: list[str]  # one per (image, question)
    sequences: np.ndarray  # [B, n] new token ids; rows that stopped early are padded
    kept_index: np.ndarray  # [B, k] the kept visual tokens, ascending
    backend: str
    reason: str  # why this backend was chosen
    tokens_kept: int  # k visual tokens per image
    tokens_total: int  # N
    prefill_length: int  # L - N + k
    timings_ms: Timings
    peak_rss_mb: float  # the process's peak resident memory so far
    quantization: QuantizationSpec | None = None  # the decoder's weight quantization (the manifest's)
    kv: KVConfig = field(default_factory=KVConfig)  # the KV-cache method and budget of the call
    kv_bytes: int = 0  # the most KV-cache bytes held during decode (after prefill, before the last token)

    @property
    def answer(self) -> str:
        """The answer to a single question (the first, for a batch)."""
        return self.answers[0]

    @property
    def tokens_per_second(self) -> float:
        step = self.timings_ms.decode_per_token
        return 1000.0 / step if step > 0 else 0.0

    def to_json(self) -> dict:
        return {"answer": self.answer if len(self.answers) == 1 else self.answers, "backend": self.backend,
                "reason": self.reason, "tokens_kept": self.tokens_kept, "tokens_total": self.tokens_total,
                "prefill_length": self.prefill_length, "new_tokens": int(self.sequences.shape[1]),
                "timings_ms": {k: round(v, 3) for k, v in asdict(self.timings_ms).items()},
                "tokens_per_second": round(self.tokens_per_second, 2), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "quantization": asdict(self.quantization) if self.quantization else None,
                "kv_method": self.kv.method, "kv_budget": None if self.kv.method == "none" else self.kv.budget,
                "kv_bytes": self.kv_bytes}


class GenerationStream:
    """Text pieces of a single answer as they are decoded; `result` is set once the iteration ends."""

    def __init__(self, steps: Iterator[list[int]], processor: PromptProcessor, finish: Callable[[], GenerationResult]):
        self._steps, self._processor, self._finish = steps, processor, finish
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        shown = ""
        for tokens in self._steps:
            text = self._processor.decode(tokens)
            if text.startswith(shown) and not text.endswith("\ufffd"):  # hold back half a UTF-8 character
                yield text[len(shown):]
                shown = text
        self.result = self._finish()
        if self.result.answer.startswith(shown) and self.result.answer != shown:
            yield self.result.answer[len(shown):]


class Pipeline:
    """One loaded export directory on one backend; `generate` may be called any number of times."""

    def __init__(self, directory: Path, manifest: Manifest, processor: PromptProcessor | None, backend: Backend,
                 reason: str, vision_cache_mb: float = VISION_MB, prefix_cache_mb: float = PREFIX_MB):
        self.directory, self.manifest, self._processor = directory, manifest, processor
        self.backend, self.reason = backend, reason
        self.vision_cache = VisionCache(vision_cache_mb)
        self.prefix_cache = PrefixCache(manifest, prefix_cache_mb)

    @classmethod
    def from_dir(cls, engine_dir: str | Path, backend: str = "auto", check_files: bool = True,
                 threads: int | None = None, vision_cache_mb: float = VISION_MB,
                 prefix_cache_mb: float = PREFIX_MB) -> "Pipeline":
        """Open `engine_dir` from its manifest alone (files checked against their sha256) on `backend`.

        threads: ONNX Runtime's intra-op threads (None: its default).
        vision_cache_mb: bound of the visual tokens kept by frame content (0: run the encoder on every call).
        prefix_cache_mb: bound of the decoder KV kept of prompt prefixes (text before the image + kept visual
            tokens) by frame and selection (0: prefill every prompt whole).
        """
        directory = Path(engine_dir)
        manifest = open_export(directory, check_files)
        processor = prompt_processor(directory, manifest)
        chosen, reason = choose_backend(directory, manifest, backend, threads)
        return cls(directory, manifest, processor, chosen, reason, vision_cache_mb, prefix_cache_mb)

    @property
    def has_processor(self) -> bool:
        """Whether the export came with a tokenizer and image preprocessing (else: `generate_from_batch` only)."""
        return self._processor is not None

    @property
    def processor(self) -> PromptProcessor:
        """The directory's tokenizer, chat template and image preprocessing."""
        if self._processor is None:
            raise CovipalError(f"{self.directory}: the manifest has no tokenizer or image preprocessing, so prompts "
                               f"cannot be built from questions; pass prompt tensors to generate_from_batch")
        return self._processor

    def generate(self, image: ImageInput | Sequence[ImageInput], question: str | Sequence[str], *,
                 max_new_tokens: int = 32, budget: Budget | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, position_policy: str | None = None, stream: bool = False,
                 ignore_eos: bool = False, color: str = "rgb",
                 kv: KVConfig | None = None) -> GenerationResult | GenerationStream:
        """Answer one question about one image, or lists of both (a batch: several cameras' frames at once).

        image: a path, encoded bytes, a PIL image, or an [H, W, 3] uint8 array or tensor (`ImageInput`).
        budget: visual tokens to keep, "all" for no pruning, None for the manifest's default.
        ignore_eos: decode all `max_new_tokens` (benchmarks).
        color: the channel order of raw pixel arrays and tensors, "rgb" or "bgr" (OpenCV frames); a BGR frame
            passed as "rgb" cannot be detected and is answered with red and blue swapped.
        kv: the KV-cache method and budget (`covipal.kv_compression.KVConfig`; default: the full cache); eviction
            and spindlekv need an export with decoder_kv.onnx (`export.py --kv-variant`), on ONNX Runtime or torch.
        """
        single = isinstance(question, str)
        images, questions = ([image], [question]) if single else (list(image), list(question))
        if stream and len(questions) != 1:
            raise CovipalError(f"stream=True answers one question at a time, got {len(questions)}")
        run = self._start(max_new_tokens, temperature, top_p, seed, budget, position_policy, ignore_eos, kv)
        steps = run.tokens(run.prepare(images, questions, color))  # bad input fails here, before streaming
        if stream:
            return GenerationStream((row[0] for row in steps), self.processor, run.result)
        for _ in steps:
            pass
        return run.result()

    def chat(self, image: ImageInput, *, budget: Budget | None = None, color: str = "rgb",
             position_policy: str | None = None, reselect: bool = False) -> Conversation:
        """A conversation about `image`: `ask(question)` answers in turn, reusing the KV cache of the image and of
        the earlier turns, so follow-ups keep the first question's visual tokens; `reselect=True` prunes again for
        each follow-up and prefills the whole chat (slower; see `covipal_export.runtime.conversation`)."""
        return Conversation(self, image, budget, color, position_policy, reselect)

    def generate_from_batch(self, batch: PromptBatch, *, max_new_tokens: int = 32, budget: Budget | None = None,
                            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                            position_policy: str | None = None, ignore_eos: bool = False,
                            kv: KVConfig | None = None) -> GenerationResult:
        """`generate` on prompt tensors already built (left-padded ids with N image tokens, pixel values)."""
        run = self._start(max_new_tokens, temperature, top_p, seed, budget, position_policy, ignore_eos, kv)
        for _ in run.tokens(run.check(batch)):
            pass
        return run.result()

    def first_token_logits(self, images: Sequence[ImageInput], questions: Sequence[str], *,
                           budget: Budget | None = None, position_policy: str | None = None) -> np.ndarray:
        """Logits [B, V] of the last prompt position (what the first answer token is picked from), one batch."""
        run = self._start(1, 0.0, 1.0, 0, budget, position_policy, False)
        _, logits, _ = run.prefill(run.prepare(images, questions))
        return logits.numpy()

    def resolve_budget(self, budget: Budget | None) -> int:
        """k for a call: the manifest's default for None, N for "all"; refused above N."""
        default = self.manifest.pruning.default_budget
        return resolve_budget(default if budget is None else budget, self.manifest.shapes.visual_tokens, "this export")

    def _start(self, max_new_tokens: int, temperature: float, top_p: float, seed: int, budget: Budget | None,
               position_policy: str | None, ignore_eos: bool, kv: KVConfig | None = None) -> "_Run":
        sampling = SamplingConfig(max_new_tokens, temperature, top_p, seed)
        policy = check_position_policy(position_policy or self.manifest.pruning.position_policy)
        kv = kv or KVConfig()
        self.backend.check_kv(kv)
        return _Run(self, sampling, self.resolve_budget(budget), policy, not ignore_eos, kv)


class _Run:
    """One `generate` call: its budget, its KV cache and the decode loop as a generator, timed stage by stage."""

    def __init__(self, pipe: Pipeline, sampling: SamplingConfig, k: int, position_policy: str, stop_at_eos: bool,
                 kv: KVConfig):
        self.pipe, self.sampling, self.k, self.position_policy = pipe, sampling, k, position_policy
        self.stop_at_eos, self.kv = stop_at_eos, kv
        self.cache: KVCache | None = None  # set when the decode loop starts
        self.timings = Timings()
        self.rows: list[list[int]] = []
        self.start = time.perf_counter()
        self.kept_index = np.zeros((0, 0), np.int64)
        self.prefill_length = 0

    def prefill(self, batch: PromptBatch) -> tuple[PrunedPrompt, torch.Tensor, KVCache]:
        """Vision -> embed + prune + splice -> prefill: the pruned prompt, the last position's logits [B, V] and
        the call's cache."""
        pipe, backend, timings = self.pipe, self.pipe.backend, self.timings
        mark = time.perf_counter()
        caching = pipe.vision_cache.enabled or pipe.prefix_cache.enabled
        frames = [digest(row) for row in batch.pixel_values] if caching else None  # what both caches key on
        visual, counts = pipe.vision_cache.encode(batch.pixel_values, backend.encode_images, frames)  # [B, N, D]
        timings.vision, mark = _ms(mark), time.perf_counter()
        timings.vision_cache_hits, timings.vision_cache_misses = counts.hits, counts.misses
        prompt = backend.prune(batch.input_ids, batch.attention_mask, visual, self.k, self.position_policy)
        timings.prune, mark = _ms(mark), time.perf_counter()
        self.kept_index, self.prefill_length = prompt.kept_index.numpy(), prompt.inputs_embeds.shape[1]
        if self.kv.method == "none":
            logits, cache, counts = pipe.prefix_cache.prefill(backend, batch, prompt, frames)  # [B, V]
        else:  # a compressed cache holds other tokens per layer and head than a prefix's full KV
            logits, cache = backend.prefill_compressed(prompt, self.kv)
            counts = CacheCounts(0, len(logits))
        timings.prefill = _ms(mark)
        timings.prefix_cache_hits, timings.prefix_cache_misses = counts.hits, counts.misses
        return prompt, logits, cache

    def tokens(self, batch: PromptBatch) -> Iterator[list[list[int]]]:
        """Yields the tokens so far, per row, after each step (at most max_new_tokens steps)."""
        prompt, logits, cache = self.prefill(batch)
        yield from self.decode(logits, cache, prompt.attention_mask, prompt.position_ids)

    def decode(self, logits: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor,
               position_ids: torch.Tensor) -> Iterator[list[list[int]]]:
        """The decode loop after a prefill: logits [B, V] of the last position, attention_mask [B, P] and
        position_ids [B, S] of what the cache holds; every token but the last is fed back into `cache`."""
        backend, special = self.pipe.backend, self.pipe.manifest.special_tokens
        step_times: list[float] = []
        self.cache = cache

        def step(token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            mark = time.perf_counter()
            logits = backend.step(cache, token, mask, position)
            step_times.append(_ms(mark))
            return logits

        self.rows = [[] for _ in range(len(logits))]
        loop = decode_loop(logits, attention_mask, position_ids, step, self.sampling, special.eos, special.pad,
                           stop_at_eos=self.stop_at_eos)
        for count, token in enumerate(loop):
            for row, value in zip(self.rows, token.tolist()):
                row.append(value)
            if count == 0:
                self.timings.ttft = _ms(self.start)
            yield self.rows
        self.timings.decode_per_token = float(np.mean(step_times)) if step_times else 0.0

    def prepare(self, images: Sequence[ImageInput], questions: Sequence[str], color: str = "rgb") -> PromptBatch:
        """Prompt ids (left-padded) and pixel values, checked against the export's batch and context sizes."""
        self._check_batch_size(len(questions))
        mark = time.perf_counter()
        batch = self.pipe.processor(images, questions, color)
        self.timings.preprocess = _ms(mark)
        return self.check(batch)

    def check(self, batch: PromptBatch) -> PromptBatch:
        """The batch fits the export: at most max_batch rows, and the pruned prompt + new tokens in its context."""
        shapes = self.pipe.manifest.shapes
        self._check_batch_size(batch.input_ids.shape[0])
        needed = batch.input_ids.shape[1] - shapes.visual_tokens + self.k + self.sampling.max_new_tokens
        if needed > shapes.max_context:
            raise CovipalError(f"the question is too long: its prompt after pruning + {self.sampling.max_new_tokens} "
                               f"new tokens need {needed} positions, this export's context holds {shapes.max_context}")
        return batch

    def _check_batch_size(self, size: int) -> None:
        max_batch = self.pipe.manifest.shapes.max_batch
        if size > max_batch:
            raise CovipalError(f"this export takes at most {max_batch} questions at once, got {size}")

    def result(self) -> GenerationResult:
        pipe = self.pipe
        sequences = np.array(self.rows, dtype=np.int64)  # [B, n]
        answers = [pipe.processor.decode(row) for row in self.rows] if pipe.has_processor else []
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return GenerationResult(answers, sequences, self.kept_index, pipe.backend.name, pipe.reason,
                                self.kept_index.shape[1], pipe.manifest.model.num_visual_tokens, self.prefill_length,
                                self.timings, peak, pipe.manifest.quantization, self.kv,
                                pipe.backend.kv_bytes(self.cache))


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0
