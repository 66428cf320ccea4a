"""The KV of a prompt's prefix, by frame and kept visual tokens: more questions about a frame prefill only their text.

A pruned prompt is [text before the image (the chat template's, ~3 tokens)] + [the k kept visual tokens] +
[the question's text]. The decoder is causal, so the KV of the first two parts, the prefix, depends on nothing
but the frame, which visual tokens are kept and the positions they hold. Where the selection ignores the question
(budget "all", a `uniform` export) every question about a frame has the same prefix; a PPM keeps the same tokens
for some questions only. The key holds all of it, so a call whose prefix differs simply misses:

    key     BLAKE2b of the frame's digest (`vision_cache.digest`), the prefix's token ids and attention mask, the
            kept indices and the prefix's position ids (which the position policy, keep or compact, gives)
    value   the decoder's KV of the prefix, p = (text before the image) + k positions, where the backend keeps
            it; 2 x layers x Hkv x p x Dh values: 2.9 MiB for mini-llava at k=64, 8.7 MiB at "all" (fp32);
            ~67 MiB for LLaVA-1.5-7B (fp16) at k=128
    miss    the call prefills its whole prompt, as without the cache; a copy of its KV's first p positions is
            kept (`Backend.copy_cache`)
    hit     the call continues from the kept prefix (its own copy where the backend writes caches in place),
            prefilling only the text after the image, at the positions and with the mask the whole prompt gives it
    bound   bytes of KV held, least recently used out (`lru.BytesLRU`); an entry larger than the bound is not
            kept; 0 turns the cache off
    rows    one row per call: a batch (several rows, each with its own padding) prefills as without the cache

Shared by the threads of one Pipeline; cached values are never written, so calls may continue from one at once.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from covipal.models.processing import PromptBatch
from covipal.pruning import PrunedPrompt, image_span
from covipal_export import names
from covipal_export.manifest import Manifest
from covipal_export.runtime.backend import Backend, KVCache
from covipal_export.runtime.lru import BytesLRU, CacheCounts

DEFAULT_MB = 256.0  # 29 prefixes of mini-llava at "all"; 3 of LLaVA-1.5-7B (fp16) at k=128, none at "all" (~290 MiB)


class PrefixCache(BytesLRU[KVCache]):
    """An LRU map from (frame, prefix ids, kept indices, positions) to the decoder's KV of that prefix."""

    def __init__(self, manifest: Manifest, max_mb: float = DEFAULT_MB):
        super().__init__(int(max_mb * 2**20))
        decoder, model = manifest.decoder, manifest.model
        past = manifest.graphs[names.DECODER].input(names.past_names(decoder.num_layers)[0])
        itemsize = np.dtype(past.dtype).itemsize
        self.bytes_per_position = 2 * decoder.num_layers * decoder.num_kv_heads * decoder.head_dim * itemsize
        self.image_token_id, self.num_visual = model.image_token_id, model.num_visual_tokens

    def prefill(self, backend: Backend, batch: PromptBatch, prompt: PrunedPrompt,
                frames: Sequence[bytes] | None) -> tuple[torch.Tensor, KVCache, CacheCounts]:
        """What `backend.prefill(prompt)` gives (logits [B, V] of the last position, the call's cache), the
        prefix's KV taken from the cache where it holds it; frames: the rows' `vision_cache.digest`s."""
        rows, width = batch.input_ids.shape
        if self.enabled and rows == 1:
            start = int(image_span(batch.input_ids, self.image_token_id, self.num_visual)[0])  # where the image is
            if start + self.num_visual < width:  # text after the image (a chat prompt always has some)
                return self._prefill_row(backend, batch, prompt, frames[0], start)
        logits, cache = backend.prefill(prompt)
        return logits, cache, CacheCounts(0, rows)

    def _prefill_row(self, backend: Backend, batch: PromptBatch, prompt: PrunedPrompt, frame: bytes,
                     start: int) -> tuple[torch.Tensor, KVCache, CacheCounts]:
        """One prompt row whose image begins at `start` in input_ids [1, L]."""
        length = start + prompt.kept_index.shape[1]  # p: the text before the image, then the kept visual tokens
        key = prefix_key(frame, batch.input_ids[:, :start], prompt.attention_mask[:, :length], prompt.kept_index,
                         prompt.position_ids[:, :length])
        held = self.get(key)
        if held is None:
            logits, cache = backend.prefill(prompt)
            nbytes = length * self.bytes_per_position
            if self.fits(nbytes):
                self.put(key, backend.copy_cache(cache, length), nbytes)
            return logits, cache, CacheCounts(0, 1)
        cache = backend.copy_cache(held)
        text = batch.input_ids[:, start + self.num_visual:]  # [1, S] the text after the image
        logits = backend.extend(cache, text, prompt.attention_mask, prompt.position_ids[:, length:])  # [1, V]
        return logits, cache, CacheCounts(1, 0)


def prefix_key(frame: bytes, *tensors: torch.Tensor) -> bytes:
    """128-bit BLAKE2b of a frame digest and integer tensors (their shapes and int64 values)."""
    hasher = hashlib.blake2b(frame, digest_size=16)
    for tensor in tensors:
        hasher.update(f"{list(tensor.shape)}".encode())
        hasher.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return hasher.digest()
