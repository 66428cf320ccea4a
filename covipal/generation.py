"""Pruned generation: vision -> prune -> splice -> prefill -> decode with a KV cache.

`generate` takes images and questions (the chat template is applied by the model's processor);
`generate_from_batch` takes already-built `PromptBatch` tensors. Greedy when temperature == 0,
otherwise temperature + top-p sampling from a seeded generator. Rows stop at EOS (padded after).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from covipal.errors import CovipalError
from covipal.models.base import VisionLanguageModel
from covipal.models.processing import ImageInput, PromptBatch
from covipal.pruning import prune_prompt
from covipal.strategies import Strategy


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
    scores: torch.Tensor | None  # [B, N]; None without pruning
    num_visual_tokens: int  # N
    prefill_length: int  # tokens in the pruned prompt, L - N + k
    extra: dict = field(default_factory=dict)


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


@torch.no_grad()
def generate_from_batch(
    model: VisionLanguageModel,
    batch: PromptBatch,
    *,
    strategy: Strategy | None = None,
    budget: int | None = None,
    position_policy: str = "keep",
    sampling: SamplingConfig | None = None,
) -> GenerationOutput:
    sampling = sampling or SamplingConfig()
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    visual = model.encode_images(batch.pixel_values)  # [B, N, D]
    embeds = model.embed_prompt(input_ids)  # [B, L, D]; image slots filled in by prune_prompt
    prompt = prune_prompt(embeds, input_ids, attention_mask, visual, model.image_token_id,
                          strategy, budget, position_policy)

    cache = model.new_cache()
    logits = model.decode(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids, cache)  # [B, 1, V]
    mask = prompt.attention_mask
    position = prompt.position_ids[:, -1:] + 1  # [B, 1], the last prompt token is never padding
    eos = torch.tensor(eos_token_ids(model), dtype=torch.long, device=input_ids.device)
    pad = model.text_config.pad_token_id if model.text_config.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(sampling.max_new_tokens):
        token = next_tokens(logits[:, -1], sampling, generator)  # [B]
        token = token.masked_fill(finished, pad)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if finished.all() or step == sampling.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [B, P+1]
        logits = model.decode(model.embed_tokens(token[:, None]), mask, position, cache)
        position = position + 1

    sequences = torch.stack(tokens, dim=1)  # [B, n]
    texts = [model.processor.decode(row) for row in sequences.tolist()] if model.processor is not None else []
    return GenerationOutput(sequences, texts, prompt.kept_index, prompt.scores, visual.shape[1],
                            prompt.inputs_embeds.shape[1])


def generate(
    model: VisionLanguageModel,
    images: Sequence[ImageInput],
    questions: Sequence[str],
    *,
    strategy: Strategy | None = None,
    budget: int | None = None,
    position_policy: str = "keep",
    sampling: SamplingConfig | None = None,
) -> GenerationOutput:
    """Answer one question per image with pruned visual tokens (budget None = no pruning)."""
    batch = model.require_processor()(images, questions)
    return generate_from_batch(model, batch, strategy=strategy, budget=budget,
                               position_policy=position_policy, sampling=sampling)
