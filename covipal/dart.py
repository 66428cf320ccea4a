"""`dart`: duplication-aware token reduction (Wen et al., "Stop Looking for Important Tokens in Multimodal
Language Models: Duplication Matters More", 2025), at the embedding level, written from the descriptions of
the paper and of TensorRT Edge-LLM's `DartPruner` (which also works on input embeddings: the paper's
decoder-layer-2 states are not there before the decoder runs).

    pivots     the `image_pivots` visual tokens with the largest L1 norm, and the `text_pivots` prompt text
               tokens with the largest L1 norm
    quota      round(k / number of pivots) tokens per pivot
    per pivot  keep the quota of not-yet-kept visual tokens least cosine-similar to it (its duplicates go)
    fill       if fewer than k are kept, the remaining tokens with the largest L2 norm
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_IMAGE_PIVOTS = 4  # the paper's default: 4 image + 4 text pivots
DEFAULT_TEXT_PIVOTS = 4


def dart_row(visual: torch.Tensor, text: torch.Tensor, k: int, image_pivots: int, text_pivots: int) -> list[int]:
    """One row's k picks in the order they were kept: visual `[N, D]`, its valid text `[T, D]`."""
    num_tokens = visual.shape[0]
    n_image = min(image_pivots, k)
    n_text = min(text_pivots, text.shape[0])
    kept = visual.abs().sum(-1).topk(n_image).indices.tolist()
    pivots = [visual[i] for i in kept] + [text[i] for i in text.abs().sum(-1).topk(n_text).indices.tolist()]
    quota = max(1, round(k / len(pivots)))
    unit = F.normalize(visual, dim=-1)  # [N, D]
    available = torch.ones(num_tokens, dtype=torch.bool)
    available[kept] = False
    for pivot in pivots:
        take = min(quota, k - len(kept), int(available.sum()))
        if take <= 0:
            break
        similarity = unit @ F.normalize(pivot, dim=-1)  # [N]
        chosen = similarity.masked_fill(~available, float("inf")).topk(take, largest=False).indices.tolist()
        kept += chosen
        available[chosen] = False
    if len(kept) < k:
        norms = visual.norm(dim=-1).masked_fill(~available, float("-inf"))
        kept += norms.topk(k - len(kept)).indices.tolist()
    return kept


def dart_picks(visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor, k: int,
               image_pivots: int = DEFAULT_IMAGE_PIVOTS, text_pivots: int = DEFAULT_TEXT_PIVOTS) -> torch.Tensor:
    """DART's k picks per row in the order they were kept, `[B, k]`."""
    visual, text = visual_tokens.float().cpu(), text_embeds.float().cpu()
    rows = [dart_row(visual[b], text[b][text_mask[b].cpu()], k, image_pivots, text_pivots)
            for b in range(visual.shape[0])]
    return torch.tensor(rows, dtype=torch.long, device=visual_tokens.device)
