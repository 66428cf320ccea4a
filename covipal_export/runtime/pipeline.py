"""`Pipeline`: an export directory answering questions about images, embeddable in an application.

    pipe = Pipeline.from_dir("engines/mini-llava-b100")            # manifest + checksums; backend "auto"
    result = pipe.generate("photo.png", "What is on the table?", budget=32)
    result.answer, result.tokens_kept, result.timings_ms.ttft
    for text in pipe.generate(image, question, stream=True): print(text, end="")

Stages: preprocessing (tokenizer, chat template, image preprocessing: all from the directory) ->
vision -> embed -> prune (budget per call) -> splice -> prefill -> decode loop with the KV cache.
Batches are lists of (image, question) pairs, left-padded like `covipal.models.processing`.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, next_tokens
from covipal.models.processing import ImageInput, PromptBatch, PromptProcessor
from covipal_export.manifest import Manifest
from covipal_export.ort_chain import PrunedPrompt, check_budget
from covipal_export.runtime.backend import Backend
from covipal_export.runtime.export_dir import open_export, prompt_processor
from covipal_export.runtime.selection import choose_backend


@dataclass
class Timings:
    """Milliseconds per stage; ttft runs from the call to the first token (preprocessing included)."""

    preprocess: float = 0.0
    vision: float = 0.0
    prune: float = 0.0  # embed + prune + splice
    prefill: float = 0.0
    ttft: float = 0.0
    decode_per_token: float = 0.0  # mean over the steps after the first token


@dataclass
class GenerationResult:
    answers: list[str]  # one per (image, question)
    sequences: np.ndarray  # [B, n] new token ids; rows that stopped early are padded
    backend: str
    reason: str  # why this backend was chosen
    tokens_kept: int  # k visual tokens per image
    tokens_total: int  # N
    prefill_length: int  # L - N + k
    timings_ms: Timings
    peak_rss_mb: float  # the process's peak resident memory so far

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
                "tokens_per_second": round(self.tokens_per_second, 2), "peak_rss_mb": round(self.peak_rss_mb, 1)}


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

    def __init__(self, directory: Path, manifest: Manifest, processor: PromptProcessor, backend: Backend, reason: str):
        self.directory, self.manifest, self.processor = directory, manifest, processor
        self.backend, self.reason = backend, reason

    @classmethod
    def from_dir(cls, engine_dir: str | Path, backend: str = "auto", check_files: bool = True) -> "Pipeline":
        """Open `engine_dir` from its manifest alone (files checked against their sha256) on `backend`."""
        directory = Path(engine_dir)
        manifest = open_export(directory, check_files)
        processor = prompt_processor(directory, manifest)
        chosen, reason = choose_backend(directory, manifest, backend)
        return cls(directory, manifest, processor, chosen, reason)

    def generate(self, image: ImageInput | Sequence[ImageInput], question: str | Sequence[str], *,
                 max_new_tokens: int = 32, budget: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, position_policy: str | None = None,
                 stream: bool = False) -> GenerationResult | GenerationStream:
        """Answer one question about one image, or lists of both (a batch); budget None: the manifest's default."""
        single = isinstance(question, str)
        images, questions = ([image], [question]) if single else (list(image), list(question))
        if stream and len(questions) != 1:
            raise CovipalError(f"stream=True answers one question at a time, got {len(questions)}")
        sampling = SamplingConfig(max_new_tokens, temperature, top_p, seed)
        budget = check_budget(self.manifest.pruning.default_budget if budget is None else budget)
        run = _Run(self, sampling, position_policy or self.manifest.pruning.position_policy)
        steps = run.tokens(run.prepare(images, questions, budget), budget)  # bad input fails here, before streaming
        if stream:
            return GenerationStream((row[0] for row in steps), self.processor, run.result)
        for _ in steps:
            pass
        return run.result()

    def first_token_logits(self, images: Sequence[ImageInput], questions: Sequence[str], *, budget: int | None = None,
                           position_policy: str | None = None) -> np.ndarray:
        """Logits [B, V] of the last prompt position (what the first answer token is picked from), one batch."""
        budget = check_budget(self.manifest.pruning.default_budget if budget is None else budget)
        run = _Run(self, SamplingConfig(max_new_tokens=1), position_policy or self.manifest.pruning.position_policy)
        _, logits = run.prefill(run.prepare(images, questions, budget), budget)
        return logits


class _Run:
    """One `generate` call: the decode loop as a generator, timed stage by stage."""

    def __init__(self, pipe: Pipeline, sampling: SamplingConfig, position_policy: str):
        self.pipe, self.sampling, self.position_policy = pipe, sampling, position_policy
        self.timings = Timings()
        self.rows: list[list[int]] = []
        self.start = time.perf_counter()
        self.tokens_kept = self.prefill_length = 0

    def prefill(self, batch: PromptBatch, budget: int) -> tuple[PrunedPrompt, np.ndarray]:
        """Vision -> embed + prune + splice -> prefill: the pruned prompt and the last position's logits [B, V]."""
        backend, timings = self.pipe.backend, self.timings
        input_ids, attention_mask = batch.input_ids.numpy(), batch.attention_mask.numpy()  # [B, L]
        mark = time.perf_counter()
        visual = backend.encode_images(batch.pixel_values.numpy())  # [B, N, D]
        timings.vision, mark = _ms(mark), time.perf_counter()
        prompt = backend.prune(input_ids, attention_mask, visual, budget, self.position_policy)
        timings.prune, mark = _ms(mark), time.perf_counter()
        self.tokens_kept, self.prefill_length = prompt.kept_index.shape[1], prompt.inputs_embeds.shape[1]
        logits = backend.prefill(prompt)  # [B, V]
        timings.prefill = _ms(mark)
        return prompt, logits

    def tokens(self, batch: PromptBatch, budget: int) -> Iterator[list[list[int]]]:
        """Yields the tokens so far, per row, after each step (at most max_new_tokens steps)."""
        backend, timings, special = self.pipe.backend, self.timings, self.pipe.manifest.special_tokens
        prompt, logits = self.prefill(batch, budget)
        generator = torch.Generator().manual_seed(self.sampling.seed)  # the reference's sampler and seeding
        mask = prompt.attention_mask  # [B, P]
        position = prompt.position_ids[:, -1:] + 1  # [B, 1], the last prompt token is never padding
        finished = np.zeros(len(logits), dtype=bool)
        self.rows = [[] for _ in logits]
        step_times: list[float] = []
        for step in range(self.sampling.max_new_tokens):
            token = next_tokens(torch.from_numpy(logits), self.sampling, generator).numpy()  # [B]
            token = np.where(finished, special.pad, token)
            for row, value in zip(self.rows, token.tolist()):
                row.append(value)
            if step == 0:
                timings.ttft = _ms(self.start)
            yield self.rows
            finished |= np.isin(token, special.eos)
            if finished.all() or step == self.sampling.max_new_tokens - 1:
                break
            mark = time.perf_counter()
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)  # [B, P+1]
            logits = backend.step(token, mask, position)
            step_times.append(_ms(mark))
            position = position + 1
        timings.decode_per_token = float(np.mean(step_times)) if step_times else 0.0

    def prepare(self, images: Sequence[ImageInput], questions: Sequence[str], budget: int) -> PromptBatch:
        """Prompt ids (left-padded) and pixel values, checked against the export's batch and context sizes."""
        shapes = self.pipe.manifest.shapes
        if len(questions) > shapes.max_batch:
            raise CovipalError(f"this export takes at most {shapes.max_batch} questions at once, got {len(questions)}")
        mark = time.perf_counter()
        batch = self.pipe.processor(images, questions)
        self.timings.preprocess = _ms(mark)
        num_visual = shapes.visual_tokens
        needed = batch.input_ids.shape[1] - num_visual + min(budget, num_visual) + self.sampling.max_new_tokens
        if needed > shapes.max_context:
            raise CovipalError(f"the question is too long: its prompt after pruning + {self.sampling.max_new_tokens} "
                               f"new tokens need {needed} positions, this export's context holds {shapes.max_context}")
        return batch

    def result(self) -> GenerationResult:
        pipe = self.pipe
        sequences = np.array(self.rows, dtype=np.int64)  # [B, n]
        answers = [pipe.processor.decode(row) for row in self.rows]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return GenerationResult(answers, sequences, pipe.backend.name, pipe.reason, self.tokens_kept,
                                pipe.manifest.model.num_visual_tokens, self.prefill_length, self.timings, peak)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0
