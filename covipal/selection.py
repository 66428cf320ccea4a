"""Keep-top-k in original order: the one selection rule every strategy, export and runtime uses.

Given scores `[B, N]` and a budget, keep exactly `k = min(budget, N)` tokens per row: the `k`
highest scores, ties broken toward the lower index, returned as ascending indices so the kept
tokens stay in their original (raster) order.
"""

from __future__ import annotations

import torch

from covipal.errors import CovipalError


def resolve_budget(budget: int | torch.Tensor, num_tokens: int) -> int:
    """Validate a budget (int or 0-d integer tensor) and return `min(budget, num_tokens)`."""
    if isinstance(budget, torch.Tensor):
        if budget.numel() != 1 or budget.dtype.is_floating_point or budget.dtype == torch.bool:
            raise CovipalError(f"budget must be a single integer, got a tensor of shape {list(budget.shape)} "
                               f"and dtype {budget.dtype}")
        budget = int(budget.item())
    elif isinstance(budget, bool) or not isinstance(budget, int):
        raise CovipalError(f"budget must be a positive integer, got {budget!r}")
    if budget <= 0:
        raise CovipalError(f"budget must be a positive integer, got {budget}")
    return min(budget, num_tokens)


def keep_topk_in_order(scores: torch.Tensor, budget: int | torch.Tensor) -> torch.Tensor:
    """Indices of the kept tokens, `[B, k]` int64, ascending within each row.

    scores: `[B, N]`, higher means more important.
    """
    if scores.dim() != 2:
        raise CovipalError(f"scores must have shape [B, N], got {list(scores.shape)}")
    k = resolve_budget(budget, scores.shape[-1])
    # A stable descending sort puts the lower index first among equal scores.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, N]
    return torch.sort(order[:, :k], dim=-1).values  # [B, k]


def gather_tokens(tokens: torch.Tensor, kept_index: torch.Tensor) -> torch.Tensor:
    """Gather kept tokens: `[B, N, D]` with `[B, k]` indices -> `[B, k, D]`."""
    index = kept_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # [B, k, D]
    return torch.gather(tokens, 1, index)
