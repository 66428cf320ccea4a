"""KV-cache compression on a graph backend: the host holds each layer's compressed cache, decoder_kv.onnx reads it.

    prefill  decoder_kv.onnx over the prompt (no past) gives, per layer, the prompt's keys (post- and pre-RoPE),
             values and last `window` queries; the host scores them (SnapKV), keeps PyramidKV's count per layer and
             builds the layer's cache with `covipal.kv_cache.compress_layer`: the functions the PyTorch path runs
    step     each layer's held cache is the past (`read`): a KV head's keys and values [B, Hkv, T, Dh] with its
             validity repeated to its query heads, or, for a SpindleKV codebook layer, the keys rebuilt from the
             codebook and RoPE'd here at their positions, one query head's slots after another's within its KV
             head [B, Hkv, G*T, Dh], each query head's mask open on its own segment only; the new token's keys
             and values join each layer afterwards (`append`), as in `covipal.kv_cache.CompressedDecoder.step`
    bytes    what the layers hold (`nbytes`), the most after any pass; the past fed to the graph is transient

The masks are per query head `[B, Hq, P_i]` and the past lengths per layer, so pruning inside the decoder at
chosen layers (ViTCoP's K-norm schedule) can feed the same graph: drop slots from a layer, or close them in its mask.
"""

from __future__ import annotations

from typing import Callable

import torch

from covipal.errors import CovipalError
from covipal.kv_compression import KVConfig, codebook_layer_count, window_scores
from covipal.pruning import PrunedPrompt
from covipal_export import names
from covipal_export.manifest import KVVariantSpec, Manifest
from covipal_export.runtime.backend import CompressedKV

RunGraph = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # decoder_kv.onnx: feeds -> outputs by name
Embed = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B, S] -> embeds [B, S, D]


def kv_variant(manifest: Manifest, kv: KVConfig) -> KVVariantSpec:
    """The manifest's decoder_kv.onnx, checked against `kv`; a one-line CovipalError when it cannot run it."""
    spec = manifest.kv_variant
    if spec is None:
        raise CovipalError(f"--kv-method {kv.method} needs {names.KV_DECODER_FILE}, which this export lacks: "
                           f"export again with `python export.py ... --kv-variant`")
    if kv.method not in spec.methods:
        raise CovipalError(f"this export's {names.KV_DECODER_FILE} runs {', '.join(spec.methods)}, not {kv.method}")
    if kv.window > spec.window:
        raise CovipalError(f"KV window {kv.window} is above the {spec.window} queries {names.KV_DECODER_FILE} returns")
    return spec


class HostRotary:
    """RoPE's cos and sin from the manifest's inverse frequencies, computed as transformers' Llama rotary embedding
    computes them (the rebuilt keys of codebook layers are rotated on the host)."""

    def __init__(self, spec: KVVariantSpec):
        self.inv_freq = torch.tensor(spec.rope_inv_freq, dtype=torch.float32)  # [Dh/2]
        self.scaling = spec.rope_attention_scaling

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, N] -> cos, sin [B, N, Dh] in x's dtype."""
        inv_freq = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)  # [B, Dh/2, 1]
        freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)  # [B, N, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(x.dtype), (emb.sin() * self.scaling).to(x.dtype)


class HostCompressedKV(CompressedKV):
    """One call's compressed cache, on the host, fed through decoder_kv.onnx by `run_graph`."""

    def __init__(self, manifest: Manifest, kv: KVConfig, run_graph: RunGraph, embed: Embed):
        self.spec = kv_variant(manifest, kv)
        self.kv, self.run_graph, self.embed = kv, run_graph, embed
        self.num_layers = manifest.decoder.num_layers
        self.kv_heads, self.head_dim = manifest.decoder.num_kv_heads, manifest.decoder.head_dim
        self.groups = self.spec.num_attention_heads // self.kv_heads
        self.rotary = HostRotary(self.spec)
        self.layers: list = []  # covipal.kv_cache.EvictedLayer | CodebookLayer, one per decoder layer
        self.peak_bytes = 0

    def prefill(self, prompt: PrunedPrompt) -> torch.Tensor:
        """Logits [B, V] of the prompt's last position; each layer keeps what `kv` says."""
        # imported here: transformers' Llama modeling pulls in torch.onnx, which importing the runtime must not load
        from covipal.kv_cache import compress_layer, layer_counts

        batch = prompt.inputs_embeds.shape[0]
        empty = torch.zeros(batch, self.kv_heads, 0, self.head_dim)  # [B, Hkv, 0, Dh]
        no_mask = torch.zeros(batch, self.spec.num_attention_heads, 0, dtype=torch.bool)  # [B, Hq, 0]
        past = {}
        for layer in range(self.num_layers):
            past.update({names.PAST_KEY % layer: empty, names.PAST_VALUE % layer: empty,
                         names.PAST_MASK % layer: no_mask})
        key_valid = prompt.attention_mask.bool()  # [B, L]
        out = self.run_graph({names.INPUTS_EMBEDS: prompt.inputs_embeds, names.INPUT_MASK: key_valid,
                              names.POSITION_IDS: prompt.position_ids, **past})
        counts = layer_counts(self.kv, key_valid, self.num_layers)  # [layers, B]
        shallow = codebook_layer_count(self.kv, self.num_layers)
        for layer in range(self.num_layers):
            keys = out[names.NEW_KEY % layer]  # [B, Hkv, L, Dh]
            scores = window_scores(out[names.WINDOW_QUERY % layer], keys.repeat_interleave(self.groups, 1), key_valid,
                                   self.spec.scaling, self.kv.window, self.kv.pool_kernel)  # [B, Hq, L]
            self.layers.append(compress_layer(scores, counts[layer], key_valid, out[names.NEW_KEY_PRE % layer], keys,
                                              out[names.NEW_VALUE % layer], prompt.position_ids, layer < shallow,
                                              self.kv))
        self.peak_bytes = self.nbytes()
        return out[names.LOGITS][:, -1].float()

    def step(self, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        feeds = {names.INPUTS_EMBEDS: self.embed(token[:, None]), names.INPUT_MASK: torch.ones(len(token), 1,
                                                                                               dtype=torch.bool),
                 names.POSITION_IDS: position_ids}
        for index, layer in enumerate(self.layers):
            keys, values, mask = self.past(*layer.read(self.rotary))
            feeds.update({names.PAST_KEY % index: keys, names.PAST_VALUE % index: values,
                          names.PAST_MASK % index: mask})
        out = self.run_graph(feeds)
        for index, layer in enumerate(self.layers):
            layer.append(out[names.NEW_KEY_PRE % index], out[names.NEW_KEY % index], out[names.NEW_VALUE % index],
                         position_ids, self.groups)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return out[names.LOGITS][:, -1].float()

    def past(self, keys: torch.Tensor, values: torch.Tensor,
             valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's held cache as decoder_kv.onnx's past: keys, values [B, Hkv, P, Dh] and mask [B, Hq, P].

        keys, values [B, H, T, Dh], valid [B, H, T]: H = Hkv (one choice per KV head: P = T), or H = Hq (a codebook
        layer: the G query heads of a KV head one after another, P = G*T, each query head's mask on its own T)."""
        batch, heads, length, dim = keys.shape
        if heads == self.kv_heads:
            return keys, values, valid.repeat_interleave(self.groups, 1)
        g = self.groups
        own = torch.eye(g, dtype=torch.bool)[None, None, :, :, None]  # [1, 1, G (query head), G (segment), 1]
        mask = (valid.view(batch, self.kv_heads, g, 1, length) & own).reshape(batch, heads, g * length)
        shape = (batch, self.kv_heads, g * length, dim)
        return keys.reshape(shape), values.reshape(shape), mask

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
