"""The training commands' disk cache of frozen-model outputs: visual tokens, vision features, labels.

    DEFAULT_CACHE                        ~/.cache/covipal, the default of every `--cache-dir`
    cache_file(dir, prefix, lines)       DIR/PREFIX-KEY.pt, KEY = the first 16 hex digits of sha256 of the lines
    load_cached(path) / save_cached      read a cached tensor (None when absent) / write one atomically

A file's name is its key, so a cache written by an earlier version of these commands still hits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

DEFAULT_CACHE = Path.home() / ".cache" / "covipal"


def cache_file(cache_dir: Path, prefix: str, lines: Iterable[str]) -> Path:
    """`cache_dir/{prefix}-{key}.pt`, keyed by everything the cached tensor was computed from (one item a line)."""
    key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return cache_dir / f"{prefix}-{key}.pt"


def load_cached(path: Path) -> torch.Tensor | None:
    """The tensor cached at `path`, or None when there is none yet."""
    return torch.load(path, weights_only=True) if path.is_file() else None


def save_cached(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    """Write `tensor` to `path` atomically (a kill never leaves half a file) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(tensor, temporary)
    temporary.replace(path)
    return tensor
