"""The decoder's attention and RMSNorm as the exported graph computes them: the same results, fewer and fused nodes.

Attention: each key/value head against its group of query heads. transformers' SDPA path repeats every key and
value head to the query heads (`repeat_kv`) whenever the query length is not known to be 1, which it never is in
an exported graph: each decode step then copies the whole past cache (3 -> 9 heads on SmolLM2) and transposes the
copies. Here the query heads of one group are stacked as rows instead (`[B, Hkv, G * S, Dh]`), so one MatMul per
group reads the cache as it is. The result is the same attention; only its order of operations differs.

RMSNorm: `x / sqrt(mean(x^2) + eps) * w`, the form ONNX Runtime fuses into one SimplifiedLayerNormalization when
a session opens (transformers' `x * rsqrt(...)` exports as 7 nodes that stay 7). TensorRT reads either form.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_ATTENTION = "covipal_grouped"


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface over `attend_grouped`: returns [B, S, Hq, Dh] and no weights."""
    return attend_grouped(query, key, value, attention_mask, scaling).transpose(1, 2), None


def attend_grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
    """query [B, Hq, S, Dh], key/value [B, Hkv, T, Dh], mask [B, 1 or Hq, S, T] (True: attend) or None.

    Returns [B, Hq, S, Dh]. Query head h reads key/value head h // (Hq / Hkv), as `repeat_kv` arranges them.
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    rows = query.reshape(batch, kv_heads, groups * length, head_dim)  # [B, Hkv, G*S, Dh]
    scores = torch.matmul(rows, key.transpose(2, 3)) * scaling  # [B, Hkv, G*S, T]
    if mask is not None:  # in the rows' order; a mask shared by the layers is arranged once in the graph
        rows_mask = (mask.view(batch, kv_heads, groups * length, -1) if mask.shape[1] == heads
                     else mask.repeat(1, 1, groups, 1))  # [B, Hkv or 1, G*S, T]
        scores = scores.masked_fill(~rows_mask, torch.finfo(scores.dtype).min)
    output = torch.matmul(scores.softmax(-1), value)  # [B, Hkv, G*S, Dh]
    return output.view(batch, heads, length, head_dim)


def grouped_attention_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' boolean SDPA mask [B, 1, S, T], never skipped: `grouped_attention` has no `is_causal`."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
AttentionMaskInterface.register(GROUPED_ATTENTION, grouped_attention_mask)


def rms_norm_by_division(norm: torch.nn.Module):
    """`norm`'s forward (a Llama-style RMSNorm: `weight`, `variance_epsilon`) with a division for the rsqrt."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # [..., D]
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        hidden = hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * hidden.to(dtype)

    return forward


@contextlib.contextmanager
def export_forms(language_model: torch.nn.Module):
    """Inside the block, the language model runs `grouped_attention` and divided RMSNorms; restored after."""
    config = language_model.config
    norms = [module for module in language_model.modules()
             if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")]
    previous = config._attn_implementation
    config._attn_implementation = GROUPED_ATTENTION
    for norm in norms:
        norm.forward = rms_norm_by_division(norm)
    try:
        yield
    finally:
        config._attn_implementation = previous
        for norm in norms:
            del norm.forward
