"""From a prompt batch to the pruned prefill: score, keep top-k in order, splice, assign positions.

    input_ids [B, L] (N image tokens per row, contiguous), attention_mask [B, L] (left padding)
      -> text_embeds [B, T, D] + text_mask [B, T]       the prompt's non-image tokens, for scoring
      -> kept_index [B, k]                              a Selector: a strategy's scores + keep_topk_in_order,
                                                        or an exported pruning graph (covipal_export's runtime)
      -> inputs_embeds [B, L-N+k, D], attention_mask, position_ids [B, L-N+k]   splice_prompt

k comes from `covipal.budget.resolve_budget`; k = N is no pruning: nothing is scored.

Position policies after pruning:
    keep     kept tokens keep their original positions (FastV style); the text after the image too
    compact  positions are contiguous over the pruned sequence
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from covipal.budget import ALL, Budget, resolve_budget
from covipal.errors import CovipalError
from covipal.selection import gather_tokens

POSITION_POLICIES = ("keep", "compact")


@dataclass
class PrunedPrompt:
    """The prefill inputs after pruning, plus what was kept."""

    inputs_embeds: torch.Tensor  # [B, S, D], S = L - N + k
    attention_mask: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    kept_index: torch.Tensor  # [B, k] ascending, into the N visual tokens
    scores: torch.Tensor | None  # [B, N]; None without pruning


class Selector(Protocol):
    """What picks the kept tokens: `covipal.strategies.Strategy`, or a runtime's pruning graph."""

    def select(self, visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """kept_index [B, k] ascending and scores [B, N], for visual_tokens [B, N, D] and the text [B, T, D]."""


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions over the valid tokens of left-padded rows (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def image_span(input_ids: torch.Tensor, image_token_id: int, num_visual: int) -> torch.Tensor:
    """Start of each row's contiguous run of `num_visual` image tokens, `[B]`."""
    image_mask = input_ids == image_token_id  # [B, L]
    counts = image_mask.sum(-1)
    if (counts != num_visual).any():
        raise CovipalError(f"each prompt needs exactly {num_visual} image tokens, got {counts.tolist()}")
    start = image_mask.int().argmax(-1)  # [B]
    span = start[:, None] + torch.arange(num_visual, device=input_ids.device)  # [B, N]
    if not torch.gather(image_mask, 1, span).all():
        raise CovipalError("the image tokens of a prompt must be contiguous")
    return start


def text_for_scoring(embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's valid non-image tokens, left-aligned: text_embeds [B, T, D] and text_mask [B, T]."""
    is_text = attention_mask.bool() & (input_ids != image_token_id)  # [B, L]
    length = int(is_text.sum(-1).max())
    order = torch.sort((~is_text).to(torch.int8), dim=-1, stable=True).indices[:, :length]  # text first, in order
    return gather_tokens(embeds, order), torch.gather(is_text, 1, order)


def prune_prompt(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual_tokens: torch.Tensor,
    image_token_id: int,
    selector: Selector | None,
    budget: Budget = ALL,
    position_policy: str = "keep",
) -> PrunedPrompt:
    """Score and prune the visual tokens, splice the kept ones into the prompt, assign positions.

    embeds: [B, L, D] token embeddings of input_ids (image slots are overwritten);
    visual_tokens: [B, N, D]; a budget of N ("all") keeps every token and scores none.
    """
    check_position_policy(position_policy)
    batch, num_visual, _ = visual_tokens.shape
    k = resolve_budget(budget, num_visual)
    if k == num_visual:
        kept_index = torch.arange(num_visual, device=embeds.device).expand(batch, -1)  # [B, N]
        scores = None
    else:
        if selector is None:
            raise CovipalError("a budget needs a strategy to score the visual tokens")
        text_embeds, text_mask = text_for_scoring(embeds, input_ids, attention_mask, image_token_id)
        kept_index, scores = selector.select(visual_tokens, text_embeds, text_mask, k)  # [B, k], [B, N]
    return splice_prompt(embeds, input_ids, attention_mask, visual_tokens, kept_index, scores, image_token_id,
                         position_policy)


def check_position_policy(position_policy: str) -> str:
    if position_policy not in POSITION_POLICIES:
        raise CovipalError(f"unknown position policy {position_policy!r}; choose one of: "
                           f"{', '.join(POSITION_POLICIES)}")
    return position_policy


def splice_prompt(embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  visual_tokens: torch.Tensor, kept_index: torch.Tensor, scores: torch.Tensor | None,
                  image_token_id: int, position_policy: str) -> PrunedPrompt:
    """Prefix + the kept visual tokens `[B, k]` of `visual_tokens [B, N, D]` + suffix, with their positions."""
    batch, num_visual, hidden = visual_tokens.shape
    start = image_span(input_ids, image_token_id, num_visual)  # [B]
    span = start[:, None] + torch.arange(num_visual, device=embeds.device)  # [B, N] positions of the image slots
    embeds = embeds.scatter(1, span.unsqueeze(-1).expand(-1, -1, hidden), visual_tokens.to(embeds.dtype))
    keep = input_ids != image_token_id  # [B, L]
    keep = keep.scatter(1, start[:, None] + kept_index, True)
    seq_index = keep.nonzero()[:, 1].view(batch, -1)  # [B, S] ascending: prefix, kept image tokens, suffix

    pruned_mask = torch.gather(attention_mask, 1, seq_index)  # [B, S]
    if position_policy == "keep":
        position_ids = torch.gather(positions_from_mask(attention_mask), 1, seq_index)
    else:
        position_ids = positions_from_mask(pruned_mask)
    return PrunedPrompt(gather_tokens(embeds, seq_index), pruned_mask, position_ids, kept_index, scores)
