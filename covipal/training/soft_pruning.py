"""Soft pruning for stage 2: the PPM's scores become a bias on each visual token's key column.

    scores [B, N] --(budget k)--> z = (s - threshold_k) / (std(s) * temperature)
    key_bias [B, N] = log(sigmoid(z))           ~0 for tokens well inside the top k, very negative below
    mask [B, 1, L, L] = causal + padding (-inf where not allowed) + key_bias on the image's columns

The mask goes to the frozen decoder as its (SDPA float) attention mask, in every layer; `answer_loss`
is the answer's cross-entropy under it. Centring on
the budget's threshold (halfway between the k-th and (k+1)-th score) and dividing by the row's spread
makes the soft mask mimic the hard top-k the PPM is used with, and keeps it from escaping the budget
by shrinking its scores. A bias of -inf on exactly the dropped tokens is the hard pruning itself with
original positions (the `keep` policy); tests check that equality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covipal.budget import ALL
from covipal.models.base import VisionLanguageModel
from covipal.pruning import image_span, prune_prompt


def soft_key_bias(scores: torch.Tensor, budget: int, temperature: float = 0.25) -> torch.Tensor:
    """log(sigmoid(z)) `[B, N]` with z the scores centred on the budget's threshold and scaled by their spread."""
    num_visual = scores.shape[-1]
    if budget >= num_visual:
        return torch.zeros_like(scores)
    top = scores.detach().topk(budget + 1, dim=-1).values  # [B, k+1], descending
    threshold = (top[:, -2] + top[:, -1]) / 2  # [B], between the k-th and the (k+1)-th score
    spread = scores.std(dim=-1, keepdim=True).clamp(min=1e-6)  # [B, 1]
    return F.logsigmoid((scores - threshold[:, None]) / (spread * temperature))


def soft_pruning_mask(attention_mask: torch.Tensor, image_start: torch.Tensor, key_bias: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal + padding mask with `key_bias [B, N]` added on the image's key columns: `[B, 1, L, L]` float.

    attention_mask: [B, L] (1 = token); image_start: [B], where each row's N visual tokens begin.
    Padding rows may attend to themselves only, so no row is all -inf.
    """
    batch, length = attention_mask.shape
    device = attention_mask.device
    position = torch.arange(length, device=device)
    allowed = (position[None, :] <= position[:, None])[None] & attention_mask.bool()[:, None, :]  # [B, L(q), L(k)]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)[None]
    column_bias = torch.zeros(batch, length, dtype=key_bias.dtype, device=device)  # [B, L]
    columns = image_start[:, None] + torch.arange(key_bias.shape[1], device=device)  # [B, N]
    column_bias = column_bias.scatter(1, columns, key_bias)
    mask = column_bias[:, None, :].expand(-1, length, -1).masked_fill(~allowed, float("-inf"))
    return mask[:, None].to(dtype)  # [B, 1, L, L]


def answer_loss(model: VisionLanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_lengths: list[int], visual_tokens: torch.Tensor, key_bias: torch.Tensor,
                kl_weight: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the answers (+ `kl_weight` x KL to the unpruned model) with `key_bias [B, N]` on the
    visual tokens `[B, N, D]` in every layer.

    input_ids / attention_mask: [B, L] left-padded prompt + answer rows; the last `answer_lengths[b]`
    tokens of row b are its answer.
    """
    full = prune_prompt(model.embed_prompt(input_ids), input_ids, attention_mask, visual_tokens,
                        model.image_token_id, None, ALL)
    start = image_span(input_ids, model.image_token_id, model.num_visual_tokens)  # [B]
    mask = soft_pruning_mask(attention_mask, start, key_bias, full.inputs_embeds.dtype)  # [B, 1, L, L]
    hidden = model.language_model(inputs_embeds=full.inputs_embeds, attention_mask=mask,
                                  position_ids=full.position_ids).last_hidden_state  # [B, L, D]
    # rows are left-padded: the answer is the last n tokens; position t predicts t + 1
    length = input_ids.shape[1]
    row_index = torch.cat([torch.full((n,), b) for b, n in enumerate(answer_lengths)])
    target_at = torch.cat([torch.arange(length - n, length) for n in answer_lengths])
    logits = model.lm_head(hidden[row_index, target_at - 1])  # [answer tokens, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32 under autocast
    loss = F.cross_entropy(logits, input_ids[row_index, target_at], reduction=reduction)
    if kl_weight > 0:
        with torch.no_grad():
            plain = soft_pruning_mask(attention_mask, start, torch.zeros_like(key_bias), full.inputs_embeds.dtype)
            teacher = model.language_model(inputs_embeds=full.inputs_embeds, attention_mask=plain,
                                           position_ids=full.position_ids).last_hidden_state
            teacher = model.lm_head(teacher[row_index, target_at - 1]).to(logits.dtype).log_softmax(-1)
        kl = F.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1)  # [answer tokens]
        loss = loss + kl_weight * (kl.sum() if reduction == "sum" else kl.mean())
    return loss
