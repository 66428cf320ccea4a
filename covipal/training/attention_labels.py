"""Stage-1 teacher: how much attention each visual token gets from the question at a guide layer.

For a full (unpruned) prompt the frozen decoder runs normally up to the guide layer `l_g`; at `l_g`
only, attention is computed explicitly for the query rows after the image (the question and the
chat template's tail):

    q = rope(q_proj(norm(h)))[rows]  [B, H, R, dh]     k = rope(k_proj(norm(h)))  [B, H, L, dh]
    A = softmax(q k^T / sqrt(dh) + causal and padding mask)                      [B, H, R, L]
    label[b, i] = sum over heads and rows of A[b, :, :, image_start + i]         [B, N]

Several guide layers can be read in one pass (a sweep). The decoders in the registry are Llama
style (LLaVA-1.5's Vicuna, SmolLM2), so RoPE and grouped KV heads follow transformers' Llama code.

`python -m covipal.training.guide_layer_sweep` uses these labels as an oracle selection to find
the layer worth imitating.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from covipal.errors import CovipalError
from covipal.models.base import VisionLanguageModel
from covipal.pruning import image_span, positions_from_mask


def default_guide_layer(model: VisionLanguageModel) -> int:
    """About the middle of the decoder stack."""
    return model.text_config.num_hidden_layers // 2


@torch.no_grad()
def visual_attention_labels(model: VisionLanguageModel, inputs_embeds: torch.Tensor, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor, guide_layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Attention mass `[B, N]` (float32) each visual token receives at every layer in `guide_layers`.

    inputs_embeds: [B, L, D], the full prompt with the visual tokens spliced in; input_ids and
    attention_mask: [B, L] (left padding) locate the image span and the query rows after it.
    """
    lm = model.language_model
    num_layers = lm.config.num_hidden_layers
    for layer in guide_layers:
        if not 0 <= layer < num_layers:
            raise CovipalError(f"guide layer must be in 0..{num_layers - 1}, got {layer}")
    num_visual = model.num_visual_tokens
    start = image_span(input_ids, model.image_token_id, num_visual)  # [B]
    position_ids = positions_from_mask(attention_mask)  # [B, L]
    mask = create_causal_mask(config=lm.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask.bool(),
                              past_key_values=None, position_ids=position_ids)
    rotary = lm.rotary_emb(inputs_embeds, position_ids=position_ids)  # (cos, sin) [B, L, dh]

    batch, length, _ = inputs_embeds.shape
    column = torch.arange(length, device=inputs_embeds.device)  # [L]
    is_query = (column[None, :] >= (start + num_visual)[:, None]) & attention_mask.bool()  # [B, L]: after the image
    allowed = (column[None, None, :] <= column[None, :, None]) & attention_mask.bool()[:, None, :]  # [B, L(q), L(k)]
    visual_columns = start[:, None] + torch.arange(num_visual, device=inputs_embeds.device)  # [B, N]

    labels, hidden = {}, inputs_embeds
    for index in range(max(guide_layers) + 1):
        decoder_layer = lm.layers[index]
        if index in guide_layers:
            attn = decoder_layer.self_attn
            normed = decoder_layer.input_layernorm(hidden)  # [B, L, D]
            q = attn.q_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # [B, H, L, dh]
            k = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # [B, Hkv, L, dh]
            q, k = apply_rotary_pos_emb(q, k, *rotary)
            k = repeat_kv(k, q.shape[1] // k.shape[1])  # [B, H, L, dh]
            logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)  # [B, H, L, L]
            logits = logits.masked_fill(~allowed[:, None], float("-inf"))
            weights = torch.softmax(logits, dim=-1)  # padding rows (no allowed key) are NaN: not query rows
            weights = torch.where(is_query[:, None, :, None], weights, 0.0)  # only the rows after the image count
            received = weights.sum(dim=(1, 2))  # [B, L]: summed over heads and query rows
            labels[index] = torch.gather(received, 1, visual_columns)  # [B, N]
        if index < max(guide_layers):
            hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
    return labels
