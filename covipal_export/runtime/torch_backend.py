"""The PyTorch reference behind the backend interface.

Unlike the graph backends it rebuilds the model from the covipal registry (weights included) with the
strategy the directory was exported with (`reference.reference_from_manifest`), so it needs what export
needed.
"""

from __future__ import annotations

import torch

from covipal.kv_compression import KVConfig
from covipal.pruning import PrunedPrompt, Selector
from covipal_export.manifest import Manifest
from covipal_export.runtime.backend import Backend, CompressedKV, KVCache
from covipal_export.runtime.reference import reference_from_manifest


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.model, self.strategy = reference_from_manifest(manifest)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)  # [B, N, D]

    @torch.inference_mode()
    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_prompt(input_ids)  # [B, L, D]

    @property
    def selector(self) -> Selector:
        return self.strategy

    @torch.inference_mode()
    def prune(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor, k: int,
              position_policy: str) -> PrunedPrompt:
        return super().prune(input_ids, attention_mask, visual, k, position_policy)

    @torch.inference_mode()
    def prefill(self, prompt: PrunedPrompt) -> tuple[torch.Tensor, KVCache]:
        cache = KVCache(self.model.new_cache())
        logits = self.model.decode(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids, cache.values)
        return logits[:, -1].float(), cache  # [B, V]

    @torch.inference_mode()
    def extend(self, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)  # [B, S, D]
        return self.model.decode(embeds, attention_mask, position_ids, cache.values)[:, -1].float()  # [B, V]

    def check_kv(self, kv: KVConfig) -> None:
        """Every method: `covipal.kv_cache.CompressedDecoder` runs the model's own modules."""

    @torch.inference_mode()
    def prefill_compressed(self, prompt: PrunedPrompt, kv: KVConfig) -> tuple[torch.Tensor, KVCache]:
        from covipal.kv_cache import CompressedDecoder

        decoder = CompressedDecoder(self.model, kv)
        logits = decoder.prefill(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids)  # [B, V]
        return logits.float(), KVCache(TorchCompressedKV(self.model, decoder))

    def full_kv_bytes(self, cache: KVCache) -> int:
        from covipal.kv_cache import dynamic_cache_bytes

        return dynamic_cache_bytes(cache.values)

    @torch.inference_mode()
    def copy_cache(self, cache: KVCache, length: int | None = None) -> KVCache:
        # a decode pass appends to the DynamicCache it is given (each layer's keys and values become new tensors,
        # torch.cat of old and new): a new DynamicCache over the same first `length` positions
        copied = self.model.new_cache()
        for index, layer in enumerate(cache.values.layers):
            copied.update(layer.keys[:, :, :length], layer.values[:, :, :length], index)  # [B, Hkv, length, Dh]
        return KVCache(copied)


class TorchCompressedKV(CompressedKV):
    """`covipal.kv_cache.CompressedDecoder` (the PyTorch path's own) behind the backend interface."""

    def __init__(self, model, decoder):
        self.model, self.decoder = model, decoder

    @property
    def peak_bytes(self) -> int:
        return self.decoder.peak_bytes

    @torch.inference_mode()
    def step(self, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(self.model.embed_tokens(token[:, None]), position_ids).float()  # [B, V]
