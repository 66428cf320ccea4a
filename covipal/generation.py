"""Pruned generation: vision -> prune -> splice -> prefill -> decode with a KV cache.

`decode_loop` is the one decode loop: the PyTorch reference below, the runtime's `Pipeline` (any
backend), the benchmark and export verification all pick and feed back tokens through it.
`generate` takes images and questions (the chat template is applied by the model's processor);
`generate_from_batch` takes already-built `PromptBatch` tensors. Greedy when temperature == 0,
otherwise temperature + top-p sampling from a seeded generator. Rows stop at EOS (padded after).
`start_decode` prefills with the KV-cache method asked for (`covipal.kv_compression`) and returns the step
the loop feeds; "none" is the model's own Hugging Face cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from covipal.budget import ALL, Budget
from covipal.errors import CovipalError
from covipal.kv_compression import KVConfig
from covipal.models.base import VisionLanguageModel
from covipal.models.processing import ImageInput, PromptBatch
from covipal.pruning import PrunedPrompt, prune_prompt
from covipal.strategies import Strategy

# step(token [B], attention_mask [B, P+1], position_ids [B, 1]) -> logits [B, V]: one decoder pass that
# appends the token to the caller's KV cache
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise CovipalError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CovipalError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CovipalError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, n] new tokens; rows that stopped early are padded
    texts: list[str]  # decoded answers ([] when the model has no tokenizer)
    kept_index: torch.Tensor  # [B, k] ascending
    scores: torch.Tensor | None  # [B, N]; None without pruning (k = N)
    num_visual_tokens: int  # N
    prefill_length: int  # tokens in the pruned prompt, L - N + k
    extra: dict = field(default_factory=dict)
    kv_bytes: int = 0  # the most KV-cache bytes held during decode (after prefill, before the last token)


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from logits `[B, V]`."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # [B, V]
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # mass before this token already >= p
        sorted_probs = sorted_probs.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    picked = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return picked.to(logits.device)


def eos_token_ids(model: VisionLanguageModel) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS, else the model config's."""
    eos = model.text_config.eos_token_id
    if model.processor is not None and model.processor.tokenizer.eos_token_id is not None:
        eos = model.processor.tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def pad_token_id(model: VisionLanguageModel) -> int:
    """The id that fills a row after it stopped (and left padding): the config's pad token, else 0."""
    pad = model.text_config.pad_token_id
    return pad if pad is not None else 0


def decode_loop(logits: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, step: DecodeStep,
                sampling: SamplingConfig, eos: Sequence[int], pad: int, *,
                stop_at_eos: bool = True) -> Iterator[torch.Tensor]:
    """Yield one token per row `[B]` (int64) per step, up to `sampling.max_new_tokens`.

    logits: [B, V] at the last prompt position; attention_mask [B, P] and position_ids [B, P] of the
    (pruned) prompt. Each token is fed back through `step`, except after the last one. A row that
    emits an EOS id is finished: it gets `pad` from then on, and the loop ends when all rows are.
    `stop_at_eos=False` ignores EOS (a benchmark decodes a fixed count).
    """
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    eos_ids = torch.tensor(list(eos), dtype=torch.long)
    mask = attention_mask
    position = position_ids[:, -1:] + 1  # [B, 1], the last prompt token is never padding
    finished = torch.zeros(logits.shape[0], dtype=torch.bool)
    for count in range(1, sampling.max_new_tokens + 1):
        token = next_tokens(logits, sampling, generator).cpu().masked_fill(finished, pad)  # [B]
        yield token
        if stop_at_eos:
            finished |= torch.isin(token, eos_ids)
        if finished.all() or count == sampling.max_new_tokens:
            return
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [B, P+1]
        logits = step(token, mask, position)
        position = position + 1


@torch.no_grad()
def generate_from_batch(
    model: VisionLanguageModel,
    batch: PromptBatch,
    *,
    strategy: Strategy | None = None,
    budget: Budget = ALL,
    position_policy: str = "keep",
    sampling: SamplingConfig | None = None,
    kv: KVConfig | None = None,
) -> GenerationOutput:
    sampling = sampling or SamplingConfig()
    kv = kv or KVConfig()
    prompt = pruned_prompt(model, batch, strategy, budget, position_policy)
    logits, step, kv_bytes = start_decode(model, prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids, kv)
    tokens = decode_loop(logits, prompt.attention_mask, prompt.position_ids, step, sampling,
                         eos_token_ids(model), pad_token_id(model))
    sequences = torch.stack(list(tokens), dim=1)  # [B, n]
    texts = [model.processor.decode(row) for row in sequences.tolist()] if model.processor is not None else []
    return GenerationOutput(sequences, texts, prompt.kept_index, prompt.scores, model.num_visual_tokens,
                            prompt.inputs_embeds.shape[1], kv_bytes=kv_bytes())


def pruned_prompt(model: VisionLanguageModel, batch: PromptBatch, strategy: Strategy | None, budget: Budget,
                  position_policy: str) -> PrunedPrompt:
    """The decoder's prefill inputs for `batch`: its images encoded, its prompt embedded, the visual tokens pruned."""
    visual = model.encode_images(batch.pixel_values)  # [B, N, D]
    embeds = model.embed_prompt(batch.input_ids)  # [B, L, D]; image slots filled in by prune_prompt
    return prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, model.image_token_id,
                        strategy, budget, position_policy)


def start_decode(model: VisionLanguageModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, kv: KVConfig) -> tuple[torch.Tensor, DecodeStep, Callable[[], int]]:
    """Prefill `inputs_embeds [B, L, D]` with the KV method of `kv`: (logits [B, V], the decode step, the most
    KV bytes held so far). "none" is the model's own cache; other methods run `covipal.kv_cache`."""
    # imported here: transformers' Llama modeling pulls in torch.onnx, which the runtime must not load
    from covipal.kv_cache import CompressedDecoder, dynamic_cache_bytes

    if kv.method != "none":
        decoder = CompressedDecoder(model, kv)
        logits = decoder.prefill(inputs_embeds, attention_mask, position_ids)

        def compressed_step(token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return decoder.step(model.embed_tokens(token[:, None].to(position.device)), position)

        return logits, compressed_step, lambda: decoder.peak_bytes
    cache = model.new_cache()
    logits = model.decode(inputs_embeds, attention_mask, position_ids, cache)  # [B, 1, V]

    def step(token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        embeds = model.embed_tokens(token[:, None].to(mask.device))  # [B, 1, D]
        return model.decode(embeds, mask, position, cache)[:, -1]  # [B, V]

    return logits[:, -1], step, lambda: dynamic_cache_bytes(cache)


def generate(
    model: VisionLanguageModel,
    images: Sequence[ImageInput],
    questions: Sequence[str],
    *,
    strategy: Strategy | None = None,
    budget: Budget = ALL,
    position_policy: str = "keep",
    sampling: SamplingConfig | None = None,
    kv: KVConfig | None = None,
) -> GenerationOutput:
    """Answer one question per image with pruned visual tokens (budget "all": no pruning) and the KV-cache
    method of `kv` (default: the full cache)."""
    batch = model.require_processor()(images, questions)
    return generate_from_batch(model, batch, strategy=strategy, budget=budget,
                               position_policy=position_policy, sampling=sampling, kv=kv)
