"""Keep-top-k in original order: the one selection rule every strategy, export and runtime uses.

Given scores `[B, N]` and a budget, keep exactly `k` tokens per row (`covipal.budget.resolve_budget`):
the `k` highest scores, ties broken toward the lower index, returned as ascending indices so the kept
tokens stay in their original (raster) order.

    keep_topk_in_order     the rule, in eager PyTorch (a stable sort)
    keep_topk_traceable    the same rule in ops an ONNX graph holds: TopK (ties toward the lower index in
                           ONNX and TensorRT), then an ascending sort; the budget is a tensor input
"""

from __future__ import annotations

import torch

from covipal.budget import Budget, resolve_budget
from covipal.errors import CovipalError


def keep_topk_in_order(scores: torch.Tensor, budget: Budget | torch.Tensor) -> torch.Tensor:
    """Indices of the kept tokens, `[B, k]` int64, ascending within each row.

    scores: `[B, N]`, higher means more important.
    """
    if scores.dim() != 2:
        raise CovipalError(f"scores must have shape [B, N], got {list(scores.shape)}")
    k = resolve_budget(budget, scores.shape[-1])
    # A stable descending sort puts the lower index first among equal scores.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, N]
    return torch.sort(order[:, :k], dim=-1).values  # [B, k]


def keep_topk_traceable(scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """`keep_topk_in_order` for export: `[B, k]` ascending indices, k = budget clamped to [1, N].

    budget: a 0-d int64 tensor (a graph input). The clamp stands in for `resolve_budget`'s errors,
    which a graph cannot raise. Exported, TopK breaks ties toward the lower index as the stable sort
    does; eager `torch.topk` does not promise that, so the two are compared through ONNX Runtime.
    """
    num_tokens = scores.shape[-1]
    k = budget.clamp(1, num_tokens).item()
    torch._check(k >= 1)
    torch._check(k <= num_tokens)
    top = torch.topk(scores, k, dim=-1).indices  # [B, k], best first
    return torch.sort(top, dim=-1).values  # [B, k] ascending


def gather_tokens(tokens: torch.Tensor, kept_index: torch.Tensor) -> torch.Tensor:
    """Gather kept tokens: `[B, N, D]` with `[B, k]` indices -> `[B, k, D]`."""
    index = kept_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # [B, k, D]
    return torch.gather(tokens, 1, index)
