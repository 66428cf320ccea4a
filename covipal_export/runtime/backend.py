"""The stage interface every backend implements, and the part the graph backends share.

A backend runs the stages of an export directory; the `Pipeline` owns tokenization, timing and the
decode loop (`covipal.generation.decode_loop`). A backend holds no generation state: `prefill` returns
the call's KV cache and each `step` extends the cache it is given, so concurrent calls do not mix.

    encode_images(pixel_values [B, 3, S, S])                   -> visual [B, N, D]
    embed_prompt(input_ids [B, L])                             -> embeds [B, L, D] (image slots as token 0)
    selector.select(visual, text_embeds, text_mask, k)         -> kept_index [B, k], scores [B, N]
    prune(input_ids, attention_mask, visual, k, policy)        -> covipal.pruning.PrunedPrompt (covipal's splice)
    prefill(prompt)                                            -> logits [B, V], cache
    extend(cache, input_ids [B, S], attention_mask [B, P+S], position_ids [B, S]) -> logits [B, V] of the last
                                                                  new position; the cache grows by S (a chat turn)
    step(cache, token [B], attention_mask [B, P+1], position_ids [B, 1]) -> extend by one token
    copy_cache(cache, length)                                  -> the first `length` positions of `cache`, which
                                                                  no later extend/step changes (a shared prefix)
    prefill_compressed(prompt, kv)                             -> logits [B, V], a cache compressed as the
                                                                  `KVConfig` says (`step` feeds it)
    kv_bytes(cache)                                            -> the KV bytes it holds (compressed: the most it held)

Tensors at this interface are torch CPU tensors; each backend converts to what it runs on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from covipal.errors import CovipalError
from covipal.kv_compression import KVConfig
from covipal.pruning import PrunedPrompt, Selector, prune_prompt
from covipal_export import names
from covipal_export.manifest import Manifest


@dataclass
class KVCache:
    """One call's decoder cache, held by the caller from `prefill` to its last `step`."""

    values: Any  # the backend's own form: ONNX Runtime OrtValues, CUDA tensors, a transformers DynamicCache, or a
    # CompressedKV


class CompressedKV(ABC):
    """A KV cache compressed per layer and head (`covipal.kv_compression`) and the decoder pass that reads it."""

    peak_bytes: int  # the most KV bytes it held, from the prefill on

    @abstractmethod
    def step(self, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (float32) after feeding token [B] at position_ids [B, 1]; the token joins the cache."""


class Backend(ABC):
    """One way of running the stages; `name` is what results and the CLI report."""

    name: str
    device: str = "cpu"  # where the decoder and its KV cache live
    manifest: Manifest

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """visual_tokens [B, N, D]."""

    @abstractmethod
    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, D]; image slots are embedded as token 0 (the splice overwrites them)."""

    @property
    @abstractmethod
    def selector(self) -> Selector:
        """What keeps the top k visual tokens: the pruning graph, or the reference strategy."""

    def prune(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor, k: int,
              position_policy: str) -> PrunedPrompt:
        """Embed the prompt, keep `k` visual tokens (1..N, checked by the caller) and splice them in."""
        embeds = self.embed_prompt(input_ids)  # [B, L, D]
        return prune_prompt(embeds, input_ids, attention_mask, visual, self.manifest.model.image_token_id,
                            self.selector, k, position_policy)

    @abstractmethod
    def prefill(self, prompt: PrunedPrompt) -> tuple[torch.Tensor, KVCache]:
        """Logits of the last prompt position [B, V] (float32) and the cache holding the prompt."""

    @abstractmethod
    def extend(self, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (float32) of the last of S new tokens per row, fed after `cache`; it grows by S."""

    def step(self, cache: KVCache, token: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (float32) after feeding one token per row; `cache` grows by one."""
        if isinstance(cache.values, CompressedKV):
            return cache.values.step(token, position_ids)
        return self.extend(cache, token[:, None], attention_mask, position_ids)

    def check_kv(self, kv: KVConfig) -> None:
        """Refuse in one line a KV-cache method this backend cannot run, before any work is done."""
        if kv.method != "none":
            raise CovipalError(f"--kv-method {kv.method} runs on ONNX Runtime and PyTorch; the {self.name} backend "
                               f"does not compress the KV cache yet")

    def prefill_compressed(self, prompt: PrunedPrompt, kv: KVConfig) -> tuple[torch.Tensor, KVCache]:
        """`prefill`, keeping the prompt's KV compressed as `kv` says (a method `check_kv` accepted, not "none")."""
        raise NotImplementedError  # backends whose check_kv accepts a method implement this

    def kv_bytes(self, cache: KVCache) -> int:
        """The KV bytes `cache` holds now; for a compressed cache, the most it held."""
        if isinstance(cache.values, CompressedKV):
            return cache.values.peak_bytes
        return self.full_kv_bytes(cache)

    @abstractmethod
    def full_kv_bytes(self, cache: KVCache) -> int:
        """The bytes of an uncompressed cache's keys and values."""

    @abstractmethod
    def copy_cache(self, cache: KVCache, length: int | None = None) -> KVCache:
        """A cache holding the first `length` positions of `cache` (None: all) that `extend`/`step` on either one
        leave alone: how several calls continue from one cached prompt prefix."""


class GraphBackend(Backend):
    """A backend that runs the exported graphs (ONNX Runtime sessions, TensorRT engines) through `run`."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._selector = GraphSelector(self)

    @abstractmethod
    def run(self, stage: str, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One graph; outputs by name, as torch tensors on the backend's device."""

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.run(names.VISION, {names.PIXEL_VALUES: pixel_values})[names.VISUAL_TOKENS].cpu()  # [B, N, D]

    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.masked_fill(input_ids == self.manifest.model.image_token_id, 0)
        return self.run(names.EMBED, {names.INPUT_IDS: input_ids})[names.TEXT_EMBEDS].cpu()  # [B, L, D]

    @property
    def selector(self) -> Selector:
        return self._selector

    def copy_cache(self, cache: KVCache, length: int | None = None) -> KVCache:
        # every decoder pass writes its present.* into new buffers and only reads its past: a cache's values are
        # never written once made, so calls may share them; a shorter cache needs its own copy
        if length is None:
            return KVCache(list(cache.values))
        return KVCache([self.kv_head(value, length) for value in cache.values])

    @abstractmethod
    def kv_head(self, value: Any, length: int) -> Any:
        """The first `length` positions of one past key or value [B, Hkv, P, Dh], in new memory."""


class GraphSelector:
    """ppm.onnx (or its engine) as a `covipal.pruning.Selector`: the budget is an input of the graph."""

    def __init__(self, backend: GraphBackend):
        self.backend = backend

    def select(self, visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = {names.VISUAL_TOKENS: visual_tokens, names.TEXT_EMBEDS: text_embeds, names.TEXT_MASK: text_mask,
                 names.BUDGET: torch.tensor(k, dtype=torch.int64)}
        out = self.backend.run(names.PRUNE, feeds)
        return out[names.KEPT_INDEX].cpu(), out[names.SCORES].cpu()  # [B, k], [B, N]
