"""A map bounded in bytes that drops its least recently used entries first: what the runtime's caches hold.

Shared by the threads of one Pipeline (a lock around every read and write). A value larger than the whole
bound is not kept; a bound of 0 keeps nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

Value = TypeVar("Value")


@dataclass
class CacheCounts:
    hits: int = 0  # rows of a call served from a cache (images, prompt prefixes)
    misses: int = 0  # rows computed


class BytesLRU(Generic[Value]):
    """Least recently used entries out once the values' bytes pass `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Value, int]] = OrderedDict()  # key -> (value, its bytes)
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def fits(self, nbytes: int) -> bool:
        """Whether a value of `nbytes` bytes would be kept (no larger than the bound)."""
        return nbytes <= self.max_bytes

    def get(self, key: Hashable) -> Value | None:
        """The value held for `key`, now the most recently used; None if there is none."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Value, nbytes: int) -> None:
        """Hold `value` (`nbytes` bytes) under `key`, unless it is held already or is larger than the bound."""
        if not self.fits(nbytes):
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size
