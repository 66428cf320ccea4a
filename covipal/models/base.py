"""The adapter interface: a LLaVA-class model split into the stages covipal prunes between.

    pixel_values [B, 3, S, S] --vision--> visual_tokens [B, N, D]      (tower + projector, in LLM space)
    input_ids    [B, T]       --embed_tokens--> text_embeds [B, T, D]
    inputs_embeds [B, S, D] + attention_mask [B, P+S] + position_ids [B, S] + KV cache
                              --decode--> logits [B, S or 1, V], updated cache

Every model in the registry (LLaVA from Hugging Face, tiny-random-llava, mini-llava) is one of these,
so pruning, export and runtime treat them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from covipal.errors import CovipalError
from covipal.models.processing import PromptProcessor


@dataclass
class ModelInfo:
    """Where a model came from, for logs and the export manifest."""

    name: str  # registry name, e.g. "llava-1.5-7b"
    source: str  # a Hub id, a local path, or "random weights (...)"
    random_weights: bool = False  # seeded random weights (rebuilt exactly from the registry), not a checkpoint
    random_init: str | None = None  # how they were made: random_init.RANDOM_INIT, or None (the model built whole)


class VisionLanguageModel(nn.Module):
    """A vision tower + projector, a token embedding and a causal decoder with its LM head."""

    def __init__(
        self,
        info: ModelInfo,
        vision: nn.Module,
        language_model: nn.Module,
        lm_head: nn.Linear,
        processor: PromptProcessor | None,
        num_visual_tokens: int,
        image_size: int,
        image_token_id: int,
    ):
        super().__init__()
        self.info = info
        self.vision = vision  # pixel_values [B, 3, S, S] -> [B, N, D]
        self.language_model = language_model  # a Hugging Face decoder stack (e.g. LlamaModel)
        self.lm_head = lm_head
        self.processor = processor  # None for random-weight builds without a tokenizer
        self.num_visual_tokens = num_visual_tokens
        self.image_size = image_size
        self.image_token_id = image_token_id

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def require_processor(self) -> PromptProcessor:
        if self.processor is None:
            raise CovipalError(f"{self.info.name} was built without a tokenizer ({self.info.source}); "
                               "pass input_ids and pixel_values directly")
        return self.processor

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens `[B, N, D]` for `pixel_values [B, 3, S, S]`."""
        expected = [3, self.image_size, self.image_size]
        if pixel_values.dim() != 4 or list(pixel_values.shape[1:]) != expected:
            raise CovipalError(f"pixel_values must have shape [B, {', '.join(map(str, expected))}] for "
                               f"{self.info.name}, got {list(pixel_values.shape)}")
        dtype = next(self.vision.parameters()).dtype
        return self.vision(pixel_values.to(dtype))

    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[B, L, D]` of a prompt; image slots are embedded as token 0 (the splice overwrites
        them)."""
        return self.embed_tokens(input_ids.masked_fill(input_ids == self.image_token_id, 0))

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.text_config)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: DynamicCache,
        last_only: bool = True,
    ) -> torch.Tensor:
        """One decoder pass (prefill or a decode step); updates `past_key_values` in place.

        inputs_embeds: [B, S, D]; attention_mask: [B, P+S] over the cache and the new tokens;
        position_ids: [B, S]. Returns logits [B, 1, V] (last position) or [B, S, V].
        """
        hidden = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        ).last_hidden_state  # [B, S, D]
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)
