"""`cdpruner`: conditional-DPP selection of visual tokens (Zhang et al., "Beyond Attention or Similarity:
Maximizing Conditional Diversity for Token Pruning in MLLMs", 2025), written from the paper's description.

    similarity  S[i, j] = cos(v_i, v_j) over the visual tokens                       [B, N, N]
    relevance   r_i = mean over the prompt's text tokens of cos(v_i, t), min-max scaled to [0, 1]   [B, N]
                (negated first when `negative_relevance`, as OpenVINO GenAI does for CLIP-based LLaVA)
    kernel      L = diag(q) S diag(q), q_i = exp(alpha r_i), alpha = theta / (2 (1 - theta))
    selection   greedy MAP of the DPP: k times, add the token with the largest gain in log det L_Y

log det L_Y = 2 alpha sum(r_Y) + log det S_Y, so each greedy step maximises
theta * r_j + (1 - theta) * log d_j^2, with d_j^2 the Cholesky residual of token j against the picks in S;
theta (`relevance_weight`) = 0 is pure diversity, theta = 1 pure relevance (the limit; no exp overflow).
The residuals follow the incremental Cholesky update of Chen et al. (NeurIPS 2018, "Fast Greedy MAP
Inference for Determinantal Point Process"), O(k N) per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covipal.errors import CovipalError

DEFAULT_RELEVANCE_WEIGHT = 0.5  # theta in the paper's experiments; OpenVINO GenAI's relevance_weight default
EPS = 1e-10


def check_relevance_weight(weight: float) -> float:
    if not 0.0 <= weight <= 1.0:
        raise CovipalError(f"--relevance-weight must be in [0, 1], got {weight:g}")
    return weight


def relevance(visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
              negative: bool) -> torch.Tensor:
    """Per-token relevance to the prompt's text, min-max scaled per row to [0, 1]: `[B, N]`."""
    v = F.normalize(visual_tokens.float(), dim=-1)  # [B, N, D]
    t = F.normalize(text_embeds.float(), dim=-1)  # [B, T, D]
    weights = text_mask.float()  # [B, T]
    r = torch.einsum("bnd,btd->bnt", v, t)  # [B, N, T]
    r = (r * weights[:, None]).sum(-1) / weights.sum(-1, keepdim=True).clamp(min=1)  # [B, N]
    if negative:
        r = -r
    low, high = r.min(-1, keepdim=True).values, r.max(-1, keepdim=True).values
    return (r - low) / (high - low).clamp(min=1e-6)


def greedy_dpp(similarity: torch.Tensor, relevance_scores: torch.Tensor, theta: float, k: int) -> torch.Tensor:
    """The k tokens picked in greedy order, `[B, k]`, for similarity `[B, N, N]` and relevance `[B, N]`."""
    batch, num_tokens, _ = similarity.shape
    rows = torch.arange(batch, device=similarity.device)
    residual = similarity.diagonal(dim1=1, dim2=2).clone()  # [B, N] d_j^2, = 1 for unit vectors
    factors = similarity.new_zeros(batch, k, num_tokens)  # [B, k, N] rows of the incremental Cholesky factor
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=similarity.device)
    picks = []
    for step in range(k):
        gain = theta * relevance_scores + (1 - theta) * residual.clamp(min=EPS).log()  # [B, N]
        pick = gain.masked_fill(taken, float("-inf")).argmax(-1)  # [B]
        picks.append(pick)
        taken[rows, pick] = True
        if step == k - 1:
            break
        pick_factor = factors[rows, :step, pick]  # [B, step]
        update = similarity[rows, pick] - torch.einsum("bs,bsn->bn", pick_factor, factors[:, :step])  # [B, N]
        update = update / residual[rows, pick].clamp(min=EPS).sqrt()[:, None]
        factors[:, step] = update
        residual = residual - update.square()
    return torch.stack(picks, dim=1)


def cdpruner_picks(visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor, k: int,
                   relevance_weight: float = DEFAULT_RELEVANCE_WEIGHT, negative_relevance: bool = True) -> torch.Tensor:
    """CDPruner's k picks in greedy order, `[B, k]`."""
    v = F.normalize(visual_tokens.float(), dim=-1)  # [B, N, D]
    similarity = v @ v.transpose(1, 2)  # [B, N, N]
    r = relevance(visual_tokens, text_embeds, text_mask, negative_relevance)
    return greedy_dpp(similarity, r, relevance_weight, k)
