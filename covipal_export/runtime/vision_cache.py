"""Visual tokens by frame content: the vision encoder runs once per frame, however many questions ask about it.

    key     a 128-bit BLAKE2b digest of one image's pixel values [3, S, S] (what the encoder sees, so a file,
            its bytes and its array share an entry; a different resize or colour order does not)
    value   its visual tokens [N, D], on the host
    bound   bytes of values held; the least recently used entries go first (`lru.BytesLRU`); 0 turns it off

The PPM is not cached: its scores depend on the question (what may be reused after it: `prefix_cache.py`).
Shared by the threads of one Pipeline.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

from covipal_export.runtime.lru import BytesLRU, CacheCounts

DEFAULT_MB = 256.0  # ~1,300 frames of mini-llava (196 x 576 fp32), ~200 of LLaVA-1.5 (576 x 4096 fp16)


class VisionCache(BytesLRU[torch.Tensor]):
    """An LRU map from frame digests to visual tokens, bounded in bytes."""

    def __init__(self, max_mb: float = DEFAULT_MB):
        super().__init__(int(max_mb * 2**20))

    def encode(self, pixel_values: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor],
               frames: Sequence[bytes] | None = None) -> tuple[torch.Tensor, CacheCounts]:
        """visual [B, N, D] for pixel_values [B, 3, S, S]: cached rows looked up, the encoder run on the others
        (each distinct frame once, as one batch). frames: the rows' `digest`s, where the caller has them."""
        if not self.enabled:
            return encoder(pixel_values), CacheCounts(0, len(pixel_values))
        keys = list(frames) if frames is not None else [digest(row) for row in pixel_values]
        found = {key: value for key in keys if (value := self.get(key)) is not None}
        missing = list(dict.fromkeys(key for key in keys if key not in found))  # distinct, in order
        if missing:
            rows = [keys.index(key) for key in missing]
            encoded = encoder(pixel_values[rows])  # [M, N, D]
            for key, value in zip(missing, encoded):
                found[key] = value.clone()  # its own storage, not a view of the batch
                self.put(key, found[key], found[key].numel() * found[key].element_size())
        visual = torch.stack([found[key] for key in keys])  # [B, N, D]
        return visual, CacheCounts(len(keys) - len(missing), len(missing))


def digest(pixels: torch.Tensor) -> bytes:
    """128-bit BLAKE2b of one image's pixel values (their bytes, shape and dtype)."""
    pixels = pixels.detach().cpu().contiguous()
    hasher = hashlib.blake2b(f"{list(pixels.shape)}{pixels.dtype}".encode(), digest_size=16)
    hasher.update(pixels.numpy().data)  # the tensor's own buffer, not a copy
    return hasher.digest()
