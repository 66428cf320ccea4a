"""The learning-rate schedule both trainers use: linear warm-up, then cosine decay to 0."""

from __future__ import annotations

import math


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """The rate at 0-based `step` of `total`: rising linearly to `peak` over `warmup` steps, then a half cosine."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))
