"""The LM's decoder on a compressed KV cache (`covipal.kv_compression`): per-layer, per-head lengths.

Hugging Face caches hold one length per layer for all heads; eviction per head and the codebook need
more, so this runs a Llama-family decoder (LlamaModel and kin: q/k/v/o projections, RoPE, RMSNorm,
MLP) layer by layer with the model's own modules, keeping for each layer:

    EvictedLayer   post-RoPE keys and values [B, H, T, D] + valid [B, H, T] (H = KV heads)
    CodebookLayer  per query head: refs, norms and positions [B, Hq, T] for K and V, valid [B, Hq, T],
                   and one K and one V codebook [C, D] per row and KV head; keys are rebuilt as
                   codebook[ref] x norm and RoPE'd again at each step (transiently, one layer at a time);
                   it keeps as many tokens as fit in the bytes an EvictedLayer would hold (equal memory)

A decode token attends to the held cache and to its own exact keys and values, then joins the cache.
`run_layers`, `layer_counts` and `compress_layer` are shared with the runtime, whose decoder_kv.onnx runs
the same layers and whose host keeps the same layer caches (covipal_export.runtime.compressed_kv).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from covipal.errors import CovipalError
from covipal.kv_compression import (
    KVConfig,
    build_codebook,
    codebook_layer_count,
    keep_indices,
    mean_keep,
    merge_or_add,
    pyramid_budgets,
    window_scores,
)


def held_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def dynamic_cache_bytes(cache) -> int:
    """KV bytes a Hugging Face DynamicCache holds (the full cache)."""
    return sum(held_bytes(layer.keys, layer.values) for layer in cache.layers if layer.keys is not None)


class EvictedLayer:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        self.keys, self.values, self.valid = keys, values, valid  # [B, H, T, D] x 2, [B, H, T]

    def append(self, keys_pre: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
               groups: int) -> None:
        """One decode token: keys/values [B, Hkv, 1, D] (post-RoPE)."""
        self.keys = torch.cat([self.keys, keys], dim=2)
        self.values = torch.cat([self.values, values], dim=2)
        self.valid = torch.cat([self.valid, self.valid.new_ones(*self.valid.shape[:2], 1)], dim=2)

    def read(self, rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.keys, self.values, self.valid

    def nbytes(self) -> int:
        return held_bytes(self.keys, self.values, self.valid)


class CodebookLayer:
    """Survivors unfolded to the query heads, K (pre-RoPE) and V replaced by codebook[ref] x norm."""

    def __init__(self, keys_pre: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, index: torch.Tensor,
                 valid: torch.Tensor, config: KVConfig):
        # keys_pre, values: [B, Hkv, L, D]; positions: [B, L]; index, valid: [B, Hq, k]
        batch, kv_heads = keys_pre.shape[:2]
        self.groups = index.shape[1] // kv_heads
        self.thresholds = (config.threshold_k, config.threshold_v)
        self.valid = valid
        self.positions = positions.gather(1, index.flatten(1)).view_as(index).to(torch.int32)
        self.books: list[list[list[torch.Tensor]]] = [[], []]  # [K or V][b][g] -> [C, D]
        self.refs, self.norms = [], []  # per K, V: [B, Hq, k] int32, [B, Hq, k]
        for which, source in enumerate((keys_pre, values)):
            unfolded = source.repeat_interleave(self.groups, dim=1)  # [B, Hq, L, D]
            kept = unfolded.gather(2, index[..., None].expand(-1, -1, -1, source.shape[-1]))  # [B, Hq, k, D]
            refs = torch.zeros(index.shape, dtype=torch.long)
            for b in range(batch):
                self.books[which].append([])
                for g in range(kv_heads):
                    heads = slice(g * self.groups, (g + 1) * self.groups)
                    tokens = index[b, heads][valid[b, heads]].unique()  # a token kept by several heads once
                    entries, token_ref = build_codebook(source[b, g, tokens], self.thresholds[which])
                    lookup = torch.zeros(source.shape[2], dtype=torch.long)
                    lookup[tokens] = token_ref
                    refs[b, heads] = lookup[index[b, heads]]
                    self.books[which][b].append(entries if entries.shape[0] else source.new_zeros(1, source.shape[-1]))
            self.refs.append(refs.to(torch.int32))
            self.norms.append(kept.norm(dim=-1).masked_fill(~valid, 0))

    def append(self, keys_pre: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
               groups: int) -> None:
        """One decode token: keys_pre/values [B, Hkv, 1, D] merge into an entry or extend the codebook."""
        batch, kv_heads = keys_pre.shape[:2]
        for which, source in enumerate((keys_pre, values)):
            refs = torch.empty(batch, kv_heads, dtype=torch.int32)
            for b in range(batch):
                for g in range(kv_heads):
                    self.books[which][b][g], refs[b, g] = merge_or_add(self.books[which][b][g], source[b, g, 0],
                                                                       self.thresholds[which])
            column = refs.repeat_interleave(self.groups, dim=1)[..., None]  # [B, Hq, 1]
            norm = source.norm(dim=-1).repeat_interleave(self.groups, dim=1)  # [B, Hq, 1]
            self.refs[which] = torch.cat([self.refs[which], column], dim=2)
            self.norms[which] = torch.cat([self.norms[which], norm], dim=2)
        position = position.to(torch.int32)[:, None, :].expand(-1, self.valid.shape[1], -1)  # [B, Hq, 1]
        self.positions = torch.cat([self.positions, position], dim=2)
        self.valid = torch.cat([self.valid, self.valid.new_ones(*self.valid.shape[:2], 1)], dim=2)

    def rebuild(self, which: int) -> torch.Tensor:
        """codebook[ref] x norm: [B, Hq, T, D]."""
        rows = []
        for b, books in enumerate(self.books[which]):
            heads = [books[h // self.groups][self.refs[which][b, h].long()] for h in range(self.valid.shape[1])]
            rows.append(torch.stack(heads))
        return torch.stack(rows) * self.norms[which][..., None]

    def read(self, rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = self.rebuild(0)  # [B, Hq, T, D], pre-RoPE
        batch, heads, length, _ = keys.shape
        cos, sin = rotary(keys, self.positions.view(batch, -1).long())  # [B, Hq*T, D]
        cos, sin = cos.view(batch, heads, length, -1), sin.view(batch, heads, length, -1)
        return keys * cos + rotate_half(keys) * sin, self.rebuild(1), self.valid

    def nbytes(self) -> int:
        books = [entries for per_row in self.books for row in per_row for entries in row]
        return held_bytes(self.valid, self.positions, *self.refs, *self.norms, *books)


def check_llama(model) -> None:
    """KV compression runs Llama-family decoders (q/k/v/o projections, RoPE, RMSNorm, MLP) layer by layer."""
    lm = model.language_model
    if not all(hasattr(lm, name) for name in ("layers", "rotary_emb", "norm", "embed_tokens")):
        raise CovipalError(f"KV compression supports Llama-family decoders, not {type(lm).__name__}")


def run_layers(model, embeds: torch.Tensor, position_ids: torch.Tensor, attend) -> torch.Tensor:
    """The decoder layer by layer with the model's own modules; logits [B, V] of the last position.

    embeds: [B, S, D]; position_ids: [B, S]. Attention is `attend(index, attn, query [B, Hq, S, Dh],
    keys_pre [B, Hkv, S, Dh] (before RoPE), keys [B, Hkv, S, Dh], values [B, Hkv, S, Dh]) -> [B, Hq, S, Dh]`:
    the caller owns the cache (`CompressedDecoder` here, the decoder_kv.onnx graph in covipal_export).
    """
    lm = model.language_model
    hidden = embeds
    cos, sin = lm.rotary_emb(hidden, position_ids)
    for index, layer in enumerate(lm.layers):
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        shape = (batch, length, -1, attn.head_dim)
        query = attn.q_proj(normed).view(shape).transpose(1, 2)  # [B, Hq, S, D]
        keys_pre = attn.k_proj(normed).view(shape).transpose(1, 2)  # [B, Hkv, S, D]
        values = attn.v_proj(normed).view(shape).transpose(1, 2)
        query, keys = apply_rotary_pos_emb(query, keys_pre, cos, sin)
        out = attend(index, attn, query, keys_pre, keys, values)  # [B, Hq, S, D]
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(lm.norm(hidden[:, -1]))  # [B, V]


def layer_counts(config: KVConfig, key_valid: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Prompt keys kept per layer and row, [num_layers, B]: PyramidKV over each row's real length."""
    per_row = [pyramid_budgets(mean_keep(config.budget, int(n)), int(n), num_layers, config.pyramid, config.window)
               for n in key_valid.sum(1)]
    return torch.tensor(per_row, dtype=torch.long).T


def evicted_bytes(batch: int, kv_heads: int, slots: int, head_dim: int, element_size: int) -> int:
    """What an `EvictedLayer` of `slots` holds: keys and values [B, Hkv, T, Dh] and valid [B, Hkv, T]."""
    return batch * kv_heads * slots * (2 * head_dim * element_size + 1)


CODEBOOK_SEARCH_STEPS = 8  # bisections (in log space) of a codebook layer's token count
CODEBOOK_MIN_FACTOR = 0.25  # a codebook layer keeps at least a quarter of eviction's count


def fitted_count(scores: torch.Tensor, count: int, key_valid: torch.Tensor, keys_pre: torch.Tensor,
                 values: torch.Tensor, position_ids: torch.Tensor, config: KVConfig) -> int:
    """SpindleKV at equal memory, for one row: the most tokens per query head (found by bisection, at least a
    quarter of `count`) whose codebook layer fits in the bytes eviction holds for `count`; what the codebook saves
    buys more tokens. A batch fits each row on its own, so it keeps what its rows keep alone.

    scores: [1, Hq, L]; key_valid: [1, L]; keys_pre, values: [1, Hkv, L, Dh]; position_ids: [1, L].
    """
    length = int(key_valid.sum())
    allowance = evicted_bytes(1, keys_pre.shape[1], count, keys_pre.shape[-1], keys_pre.element_size())

    def fits(kept: int) -> bool:
        index, valid = keep_indices(scores, torch.tensor([kept]), key_valid)
        return CodebookLayer(keys_pre, values, position_ids, index, valid, config).nbytes() <= allowance

    low, too_many = max(1, round(count * CODEBOOK_MIN_FACTOR)), length + 1  # low is taken even if it does not fit
    for _ in range(CODEBOOK_SEARCH_STEPS):
        if too_many - low <= 1:
            break
        middle = min(max(round(math.sqrt(low * too_many)), low + 1), too_many - 1)
        low, too_many = (middle, too_many) if fits(middle) else (low, middle)
    return low


def compress_layer(scores: torch.Tensor, counts: torch.Tensor, key_valid: torch.Tensor, keys_pre: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, position_ids: torch.Tensor, codebook: bool,
                   config: KVConfig) -> EvictedLayer | CodebookLayer:
    """One layer's prompt cache after eviction: per query head with a codebook, else one choice per KV head.

    scores: [B, Hq, L] (`window_scores`); counts: [B]; key_valid: [B, L]; keys_pre, keys, values: [B, Hkv, L, Dh];
    position_ids: [B, L].
    """
    if codebook:  # unfolded: one choice per query head, in the bytes eviction would hold for `counts`
        rows = [slice(b, b + 1) for b in range(len(counts))]
        counts = torch.tensor([fitted_count(scores[row], int(count), key_valid[row], keys_pre[row], values[row],
                                            position_ids[row], config) for row, count in zip(rows, counts)])
        kept, valid = keep_indices(scores, counts, key_valid)
        return CodebookLayer(keys_pre, values, position_ids, kept, valid, config)
    grouped = scores.unflatten(1, (keys.shape[1], -1)).mean(2)  # [B, Hkv, L], the group's mean score
    kept, valid = keep_indices(grouped, counts, key_valid)
    take = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
    return EvictedLayer(keys.gather(2, take), values.gather(2, take), valid)


def attend_held(query: torch.Tensor, held_keys: torch.Tensor, held_values: torch.Tensor, valid: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Decode attention: query [B, Hq, 1, Dh] over a layer's held cache (`read`: [B, H, T, Dh], valid [B, H, T],
    H = Hkv or Hq) and the new token's own keys and values [B, Hkv, 1, Dh], exact (not rebuilt)."""
    heads = query.shape[1]
    held_keys, held_values, valid = (t.repeat_interleave(heads // held_keys.shape[1], 1)
                                     for t in (held_keys, held_values, valid))
    keys, values = (t.repeat_interleave(heads // keys.shape[1], 1) for t in (keys, values))
    mask = torch.cat([valid, valid.new_ones(*valid.shape[:2], 1)], dim=2)[:, :, None, :]  # [B, Hq, 1, T+1]
    return F.scaled_dot_product_attention(query, torch.cat([held_keys, keys], 2), torch.cat([held_values, values], 2),
                                          attn_mask=mask, scale=scaling)


class CompressedDecoder:
    """Prefill once (compressing each layer as it goes), then one decode step per token."""

    def __init__(self, model, config: KVConfig):
        check_llama(model)
        self.model, self.lm, self.config = model, model.language_model, config
        self.layers: list[EvictedLayer | CodebookLayer] = []
        self.peak_bytes = 0

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """embeds [B, L, D], attention_mask [B, L] (left padding), position_ids [B, L] -> logits [B, V]."""
        config, key_valid = self.config, attention_mask.bool()
        length = embeds.shape[1]
        num_layers = len(self.lm.layers)
        shallow = codebook_layer_count(config, num_layers)
        counts = layer_counts(config, key_valid, num_layers)  # [layers, B]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = (causal & key_valid[:, None, None, :]) | torch.eye(length, dtype=torch.bool)  # [B, 1, L, L]

        def attend(index, attn, query, keys_pre, keys, values):
            groups = attn.num_key_value_groups
            full_keys, full_values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
            out = F.scaled_dot_product_attention(query, full_keys, full_values, attn_mask=mask, scale=attn.scaling)
            scores = window_scores(query, full_keys, key_valid, attn.scaling, config.window, config.pool_kernel)
            self.layers.append(compress_layer(scores, counts[index], key_valid, keys_pre, keys, values, position_ids,
                                              index < shallow, config))
            return out

        logits = run_layers(self.model, embeds, position_ids, attend)
        self.peak_bytes = self.nbytes()
        return logits

    def step(self, embeds: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One token: embeds [B, 1, D], position [B, 1] -> logits [B, V]; the cache grows by it.

        The token attends to the held cache and to its own exact keys and values; it joins the cache after."""
        def attend(index, attn, query, keys_pre, keys, values):
            layer = self.layers[index]
            out = attend_held(query, *layer.read(self.lm.rotary_emb), keys, values, attn.scaling)
            layer.append(keys_pre, keys, values, position, attn.num_key_value_groups)
            return out

        logits = run_layers(self.model, embeds, position, attend)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return logits

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
