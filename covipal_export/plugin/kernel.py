"""The TopK-gather computation in torch: the same function on the CPU and in CUDA.

It applies `covipal.selection`'s rule itself (top k, ties toward the lower index, ascending order),
so the plugin keeps exactly what PyTorch and ppm.onnx keep. `topk_gather_into` writes into
preallocated outputs (TensorRT's buffers) and never waits on the device: k is the outputs' size.
"""

from __future__ import annotations

import torch

from covipal.selection import keep_topk_in_order


def kept_count(budget: int, num_tokens: int) -> int:
    """k = clamp(budget, 1, N), as ppm.onnx clamps its budget input."""
    return max(1, min(budget, num_tokens))


def topk_gather_into(scores: torch.Tensor, tokens: torch.Tensor, kept_tokens: torch.Tensor,
                     kept_index: torch.Tensor) -> None:
    """scores [B, N], tokens [B, N, D] -> kept_tokens [B, k, D], kept_index [B, k] int64, written in place."""
    kept_index.copy_(keep_topk_in_order(scores, kept_index.shape[1]))  # [B, k]
    index = kept_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # [B, k, D]
    torch.gather(tokens, 1, index, out=kept_tokens)


def topk_gather(scores: torch.Tensor, tokens: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The op with its own outputs: (kept_tokens [B, k, D], kept_index [B, k]), k = clamp(budget, 1, N)."""
    batch, num_tokens = scores.shape
    k = kept_count(budget, num_tokens)
    kept_tokens = tokens.new_empty(batch, k, tokens.shape[-1])
    kept_index = torch.empty(batch, k, dtype=torch.int64, device=scores.device)
    topk_gather_into(scores, tokens, kept_tokens, kept_index)
    return kept_tokens, kept_index
