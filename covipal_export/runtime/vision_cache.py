"""Visual tokens by frame content: the vision encoder runs once per frame, however many questions ask about it.

    key     a 128-bit BLAKE2b digest of one image's pixel values [3, S, S] (what the encoder sees, so a file,
            its bytes and its array share an entry; a different resize or colour order does not)
    value   its visual tokens [N, D], on the host
    bound   bytes of values held; the least recently used entries go first; 0 turns the cache off

The PPM is not cached: its scores depend on the question. Shared by the threads of one Pipeline (a lock).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_MB = 256.0  # ~1,300 frames of mini-llava (196 x 576 fp32), ~200 of LLaVA-1.5 (576 x 4096 fp16)


@dataclass
class CacheCounts:
    hits: int = 0  # images whose visual tokens came from the cache
    misses: int = 0  # images the vision encoder ran on


class VisionCache:
    """An LRU map from frame digests to visual tokens, bounded in bytes."""

    def __init__(self, max_mb: float = DEFAULT_MB):
        self.max_bytes = int(max_mb * 2**20)
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def encode(self, pixel_values: torch.Tensor,
               encoder: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, CacheCounts]:
        """visual [B, N, D] for pixel_values [B, 3, S, S]: cached rows looked up, the encoder run on the others
        (each distinct frame once, as one batch)."""
        if self.max_bytes <= 0:
            return encoder(pixel_values), CacheCounts(0, len(pixel_values))
        keys = [digest(row) for row in pixel_values]
        found = {key: value for key in keys if (value := self._get(key)) is not None}
        missing = list(dict.fromkeys(key for key in keys if key not in found))  # distinct, in order
        if missing:
            rows = [keys.index(key) for key in missing]
            encoded = encoder(pixel_values[rows])  # [M, N, D]
            for key, value in zip(missing, encoded):
                found[key] = value.clone()  # its own storage, not a view of the batch
                self._put(key, found[key])
        visual = torch.stack([found[key] for key in keys])  # [B, N, D]
        return visual, CacheCounts(len(keys) - len(missing), len(missing))

    def _get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()


def digest(pixels: torch.Tensor) -> bytes:
    """128-bit BLAKE2b of one image's pixel values (their bytes, shape and dtype)."""
    pixels = pixels.detach().cpu().contiguous()
    hasher = hashlib.blake2b(f"{list(pixels.shape)}{pixels.dtype}".encode(), digest_size=16)
    hasher.update(pixels.numpy().data)  # the tensor's own buffer, not a copy
    return hasher.digest()
