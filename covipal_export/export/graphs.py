"""The four graphs: export wrappers around the PyTorch stages, with sample inputs and dynamic shapes.

    graph         inputs                                             outputs
    vision.onnx   pixel_values   [batch, 3, S, S] float32            visual_tokens [batch, N, D]
    embed.onnx    input_ids      [batch, sequence] int64             text_embeds   [batch, sequence, D]
    ppm.onnx      visual_tokens  [batch, N, D]                       kept_tokens   [batch, kept, D]
                  text_embeds    [batch, text, D]                    kept_index    [batch, kept] int64, ascending
                  text_mask      [batch, text] int64                 scores        [batch, N] float32
                  budget         [] int64
    decoder.onnx  inputs_embeds  [batch, sequence, D]                logits        [batch, 1 | sequence, V]
                  attention_mask [batch, total] int64                present.%d.key/value [batch, Hkv, total, Dh]
                  position_ids   [batch, sequence] int64
                  past_key_values.%d.key/value [batch, Hkv, past, Dh]

`--kv-variant` adds decoder_kv.onnx (`KVDecoderGraph`): the decoder on a KV cache compressed on the host, with a
past length per layer and a past mask per query head (names.kv_graph_io; the manifest's kv_variant).

D-wide tensors, logits and the KV cache are in the export dtype; total = past + sequence; past may be 0
(prefill). Each wrapper calls the same `VisionLanguageModel` method or strategy the PyTorch path uses,
so the graphs compute what covipal computes. The model decides its graphs here; onnx_export.py exports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.export import Dim

from covipal.errors import CovipalError
from covipal.kv_cache import check_llama, run_layers
from covipal.kv_compression import KV_METHODS, KVConfig
from covipal.models import VisionLanguageModel
from covipal.selection import gather_tokens, keep_topk_traceable
from covipal.strategies import Strategy
from covipal_export import names
from covipal_export.export.decoder_forms import attend_grouped, export_forms
from covipal_export.manifest import GraphSpec, KVVariantSpec, ShapeRanges

SAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1: every dynamic sample size is >= 2
SAMPLE_TEXT, SAMPLE_SEQUENCE, SAMPLE_PAST = 3, 5, 3


def shape_ranges(model: VisionLanguageModel, max_batch: int) -> ShapeRanges:
    """Batch up to `max_batch`, the model's N visual tokens, and its whole position range as context."""
    max_context = model.text_config.max_position_embeddings
    if max_context <= model.num_visual_tokens:
        raise CovipalError(f"{model.info.name}: a context of {max_context} positions cannot hold "
                           f"{model.num_visual_tokens} visual tokens")
    return ShapeRanges(max_batch, model.num_visual_tokens, max_context - model.num_visual_tokens, max_context)


def kv_cache_shape(model: VisionLanguageModel) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): one layer's cache entry is [B, num_kv_heads, length, head_dim]."""
    config = model.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


@dataclass
class OnnxSpec:
    """Everything the exporter needs for one graph."""

    stage: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    dim_names: dict[str, str] = field(default_factory=dict)  # the exporter's dimension names -> canonical ones
    layers: int = 0  # decoder layers whose outputs are named names.HIDDEN_STATES in the graph (0: none)


class VisionGraph(nn.Module):
    """pixel_values [B, 3, S, S] float32 -> visual_tokens [B, N, D] (tower + projector)."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class EmbedGraph(nn.Module):
    """input_ids [B, L] -> text_embeds [B, L, D], the token embedding table as a Gather."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)


class PruneGraph(nn.Module):
    """Score the visual tokens and keep the top `budget` in their original order.

    The budget is a runtime input, clamped to [1, N] by `covipal.selection.keep_topk_traceable` (the
    runtime refuses other budgets before it feeds one): keep-top-k in order, as
    `covipal.selection.keep_topk_in_order`, which verify.py checks on every export.
    """

    def __init__(self, strategy: Strategy):
        super().__init__()
        self.strategy = strategy

    def forward(self, visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.strategy.scores(visual_tokens, text_embeds, text_mask, budget)  # [B, N] float32
        kept_index = keep_topk_traceable(scores, budget)  # [B, k] ascending
        return gather_tokens(visual_tokens, kept_index), kept_index, scores  # [B, k, D], [B, k], [B, N]


class DecoderGraph(nn.Module):
    """One decoder pass, prefill (past 0) or decode step, with the KV cache as flat inputs and outputs."""

    def __init__(self, model: VisionLanguageModel, last_logits_only: bool):
        super().__init__()
        self.model = model
        self.last_logits_only = last_logits_only

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[tuple[torch.Tensor, torch.Tensor], ...]):
        cache = self.model.new_cache()
        for layer, (key, value) in enumerate(past):  # [B, Hkv, P, Dh] each
            cache.update(key, value, layer)
        with export_forms(self.model.language_model):
            logits = self.model.decode(inputs_embeds, attention_mask, position_ids, cache,
                                       last_only=self.last_logits_only)
        present = tuple((cache.layers[i].keys, cache.layers[i].values) for i in range(len(past)))  # [B, Hkv, P+S, Dh]
        return logits, present


def graph_specs(model: VisionLanguageModel, strategy: Strategy, ranges: ShapeRanges, budget: int,
                last_logits_only: bool) -> list[OnnxSpec]:
    """The specs of vision.onnx, embed.onnx, ppm.onnx and decoder.onnx, in pipeline order."""
    dtype = model.embed_tokens.weight.dtype
    hidden, size = model.hidden_size, model.image_size
    num_layers, num_kv_heads, head_dim = kv_cache_shape(model)
    batch = Dim(names.BATCH, min=1, max=ranges.max_batch)
    text = Dim(names.TEXT, min=1, max=ranges.max_text)
    sequence = Dim(names.SEQUENCE, min=1, max=ranges.max_context)
    past = Dim(names.PAST, min=0, max=ranges.max_context - 1)
    total = Dim(names.TOTAL, min=1, max=ranges.max_context)  # its own Dim: torch.export has no Dim + Dim
    B, T, S, P = SAMPLE_BATCH, SAMPLE_TEXT, SAMPLE_SEQUENCE, SAMPLE_PAST

    vision = OnnxSpec(names.VISION, VisionGraph(model), (torch.randn(B, 3, size, size),),
                      *names.graph_io(names.VISION, num_layers), ({0: batch},))
    embed = OnnxSpec(names.EMBED, EmbedGraph(model), (torch.randint(0, model.text_config.vocab_size, (B, S)),),
                     *names.graph_io(names.EMBED, num_layers), ({0: batch, 1: sequence},))
    prune = OnnxSpec(
        names.PRUNE, PruneGraph(strategy),
        (torch.randn(B, ranges.visual_tokens, hidden, dtype=dtype), torch.randn(B, T, hidden, dtype=dtype),
         torch.ones(B, T, dtype=torch.long), torch.tensor(budget, dtype=torch.long)),
        *names.graph_io(names.PRUNE, num_layers),
        ({0: batch}, {0: batch, 1: text}, {0: batch, 1: text}, None),
        dim_names={"u0": names.KEPT},  # the data-dependent size k = clamp(budget, 1, N)
    )
    cache = tuple((torch.randn(B, num_kv_heads, P, head_dim, dtype=dtype),
                   torch.randn(B, num_kv_heads, P, head_dim, dtype=dtype)) for _ in range(num_layers))
    decoder = OnnxSpec(
        names.DECODER, DecoderGraph(model, last_logits_only),
        (torch.randn(B, S, hidden, dtype=dtype), torch.ones(B, P + S, dtype=torch.long),
         torch.arange(P, P + S).expand(B, -1).clone(), cache),
        *names.graph_io(names.DECODER, num_layers),
        ({0: batch, 1: sequence}, {0: batch, 1: total}, {0: batch, 1: sequence},
         tuple(({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(num_layers))),
        dim_names={f"{names.PAST} + {names.SEQUENCE}": names.TOTAL}, layers=num_layers,
    )
    return [vision, embed, prune, decoder]


class KVDecoderGraph(nn.Module):
    """decoder_kv.onnx: one decoder pass over a cache the host holds and compresses, layer by layer.

    inputs_embeds [B, S, D], input_mask [B, S] (the new tokens' validity), position_ids [B, S], and per layer i
    past key/value [B, Hkv, P_i, Dh] (post-RoPE) and past_mask [B, Hq, P_i]. Query head h attends to the past slots
    its mask allows and causally to the valid new tokens (always to itself). Per layer it returns the new tokens'
    keys (post- and pre-RoPE) and values [B, Hkv, S, Dh] and its last `window` queries [B, Hq, min(window, S), Dh];
    the host appends what it keeps (`covipal.kv_cache.compress_layer` after a prefill, `append` after a step).
    """

    def __init__(self, model: VisionLanguageModel, window: int):
        super().__init__()
        self.model, self.window = model, window

    def forward(self, inputs_embeds: torch.Tensor, input_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]):
        length = inputs_embeds.shape[1]
        steps = torch.arange(length)
        new_mask = (steps[None, :] <= steps[:, None]) & input_mask.bool()[:, None, :]  # [B, S, S] causal, valid keys
        new_mask = new_mask | (steps[None, :] == steps[:, None])  # a padding query attends to itself
        outputs: list[torch.Tensor] = []

        def attend(index, attn, query, keys_pre, keys, values):
            past_key, past_value, past_mask = past[index]
            heads = query.shape[1]
            all_keys = torch.cat([past_key, keys], 2)  # [B, Hkv, P+S, Dh]
            all_values = torch.cat([past_value, values], 2)
            mask = torch.cat([past_mask[:, :, None, :].expand(-1, -1, length, -1),
                              new_mask[:, None].expand(-1, heads, -1, -1)], dim=-1)  # [B, Hq, S, P+S]
            outputs.extend([keys, keys_pre, values, query[:, :, -self.window:]])
            return attend_grouped(query, all_keys, all_values, mask, attn.scaling)

        with export_forms(self.model.language_model):
            logits = run_layers(self.model, inputs_embeds, position_ids, attend)[:, None]  # [B, 1, V]
        return logits, tuple(outputs)


def kv_variant_spec(model: VisionLanguageModel, ranges: ShapeRanges) -> OnnxSpec:
    """decoder_kv.onnx's spec: a Llama-family decoder, a past length per layer (samples of different lengths)."""
    check_llama(model)
    rotary = model.language_model.rotary_emb
    if "dynamic" in rotary.rope_type:
        raise CovipalError(f"--kv-variant: RoPE type {rotary.rope_type!r} changes its frequencies with the length; "
                           f"rebuilt keys could not be rotated on the host")
    dtype = model.embed_tokens.weight.dtype
    num_layers, num_kv_heads, head_dim = kv_cache_shape(model)
    heads = model.text_config.num_attention_heads
    batch = Dim(names.BATCH, min=1, max=ranges.max_batch)
    sequence = Dim(names.SEQUENCE, min=1, max=ranges.max_context)
    B, S = SAMPLE_BATCH, SAMPLE_SEQUENCE
    past, dynamic = [], []
    for layer in range(num_layers):
        length = SAMPLE_PAST + layer  # lengths differ, as after PyramidKV
        cache = torch.randn(B, num_kv_heads, length, head_dim, dtype=dtype)
        past.append((cache, cache.clone(), torch.rand(B, heads, length) > 0.3))
        dim = Dim(names.past_dim(layer), min=0, max=ranges.max_context - 1)
        dynamic.append(({0: batch, 2: dim}, {0: batch, 2: dim}, {0: batch, 2: dim}))
    window = KVConfig().window
    min_window = f"Max(0, {names.SEQUENCE} - Max(0, {names.SEQUENCE} - {window}))"  # the exporter's name of min(16, S)
    args = (torch.randn(B, S, model.hidden_size, dtype=dtype), torch.ones(B, S, dtype=torch.bool),
            torch.arange(S).expand(B, -1).clone(), tuple(past))
    return OnnxSpec(names.KV_DECODER, KVDecoderGraph(model, window), args, *names.kv_graph_io(num_layers),
                    ({0: batch, 1: sequence}, {0: batch, 1: sequence}, {0: batch, 1: sequence}, tuple(dynamic)),
                    dim_names={min_window: names.WINDOW})


def kv_methods(kv_variant: bool) -> tuple[str, ...]:
    """The KV compression methods decoder_kv.onnx runs (none without the variant)."""
    return tuple(m for m in KV_METHODS if m != "none") if kv_variant else ()


def kv_variant_manifest(model: VisionLanguageModel, graph: GraphSpec) -> KVVariantSpec:
    """The manifest's kv_variant section for an exported decoder_kv.onnx."""
    rotary = model.language_model.rotary_emb
    return KVVariantSpec(graph=graph, methods=list(kv_methods(True)),
                         num_attention_heads=model.text_config.num_attention_heads, window=KVConfig().window,
                         scaling=float(model.language_model.layers[0].self_attn.scaling),
                         rope_inv_freq=rotary.inv_freq.float().tolist(),
                         rope_attention_scaling=float(rotary.attention_scaling))
