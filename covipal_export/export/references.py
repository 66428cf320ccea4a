"""What PyTorch computes for verification, made once, before any graph runs, so the model can be released first.

A 7B model in fp16 is 14 GB and ONNX Runtime needs its own copy of each graph's weights: holding both would
double the export's peak. So the reference side of every check is computed up front (`compute_references`)
and kept as small tensors (the KV cache of a short prompt is the largest: 0.2 GB for LLaVA-1.5-7B); the
checks in verify.py then need no model.

    prompts    the model's own processor on the tokenizer check's images and questions
    stages     visual tokens, text embeddings, scores and kept indices (at budgets 1, the default and N)
    decoder    a prefill over the pruned prompt and one decode step: inputs, logits, present KV
    chain      greedy tokens of covipal.generation.generate_from_batch for both position policies
    kv         greedy tokens and KV bytes held on a compressed KV cache, per method, at budget KV_BUDGET
               (exports with decoder_kv.onnx)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from covipal.generation import SamplingConfig, generate_from_batch, pad_token_id
from covipal.kv_compression import KVConfig
from covipal.models import PromptBatch, VisionLanguageModel
from covipal.pruning import POSITION_POLICIES, prune_prompt, text_for_scoring
from covipal.selection import keep_topk_in_order
from covipal.strategies import Strategy
from covipal_export import names

KV_BUDGET = 0.4  # the KV budget the kv check runs each method at
SAMPLE_QUESTIONS = ["What is on the table?", "How many people are in the picture? Answer with one word.",
                    "Describe the image in detail.", "What color is the car?"]


@dataclass
class DecoderStep:
    """One decoder pass of the PyTorch model (its past: the previous step's present)."""

    name: str  # "prefill", "decode step"
    feeds: dict[str, np.ndarray]  # inputs_embeds [B, S, D], attention_mask [B, P+S], position_ids [B, S]
    logits: torch.Tensor  # [B, 1 | S, V]
    present: torch.Tensor  # [2L, B, Hkv, P+S, Dh]: layer 0 key, layer 0 value, layer 1 key, ...


@dataclass
class References:
    batch: PromptBatch  # the sample prompts: input_ids [B, L], attention_mask [B, L], pixel_values [B, 3, S, S]
    prompts: PromptBatch | None  # the model's processor on `tokenizer_inputs` (None: the model has no processor)
    visual: torch.Tensor  # [B, N, D]
    input_ids: torch.Tensor  # [B, L], image slots as token 0: embed.onnx's input
    embeds: torch.Tensor  # [B, L, D]
    text_embeds: torch.Tensor  # [B, T, D], the text the pruner reads
    text_mask: torch.Tensor  # [B, T]
    prune: dict[int, tuple[torch.Tensor, torch.Tensor]]  # budget -> scores [B, N], kept_index [B, k]
    decoder: list[DecoderStep]
    chain: dict[str, tuple[np.ndarray, np.ndarray]]  # position policy -> kept_index [B, k], sequences [B, new]
    new_tokens: int
    kv: dict[str, tuple[np.ndarray, int]]  # KV method -> sequences [B, new], KV bytes held (default policy)


def tokenizer_inputs(batch_size: int) -> tuple[list[np.ndarray], list[str]]:
    """Images and questions the tokenizer check feeds to both processors."""
    rng = np.random.default_rng(1)
    return [(rng.random((40, 60, 3)) * 255).astype(np.uint8) for _ in range(batch_size)], \
        SAMPLE_QUESTIONS[:batch_size]


@torch.no_grad()
def compute_references(model: VisionLanguageModel, strategy: Strategy, budget: int, position_policy: str,
                       last_only: bool, *, batch_size: int = 2, new_tokens: int = 16,
                       kv_methods: tuple[str, ...] = ()) -> References:
    """Every PyTorch output the checks compare with, on `sample_batch(model, batch_size)` (`kv_methods`: the KV
    compression methods an export's decoder_kv.onnx is checked on)."""
    batch = sample_batch(model, batch_size)
    prompts = model.processor(*tokenizer_inputs(batch_size)) if model.processor is not None else None
    input_ids = batch.input_ids.masked_fill(batch.input_ids == model.image_token_id, 0)
    visual = model.encode_images(batch.pixel_values)  # [B, N, D]
    embeds = model.embed_tokens(input_ids)  # [B, L, D]
    text_embeds, text_mask = text_for_scoring(embeds, batch.input_ids, batch.attention_mask, model.image_token_id)
    prune = {}
    for k in sorted({1, budget, model.num_visual_tokens}):
        scores = strategy.scores(visual, text_embeds, text_mask, k)  # [B, N]
        prune[k] = scores, keep_topk_in_order(scores, k)
    decoder = decoder_steps(model, strategy, batch, visual, embeds, budget, position_policy, last_only)
    chain = {}
    for policy in POSITION_POLICIES:
        result = generate_from_batch(model, batch, strategy=strategy, budget=budget, position_policy=policy,
                                     sampling=SamplingConfig(new_tokens))
        chain[policy] = result.kept_index.numpy(), result.sequences.numpy()
    kv = {}
    for method in kv_methods:
        result = generate_from_batch(model, batch, strategy=strategy, budget=budget, position_policy=position_policy,
                                     sampling=SamplingConfig(new_tokens), kv=KVConfig(method, KV_BUDGET))
        kv[method] = result.sequences.numpy(), result.kv_bytes
    return References(batch, prompts, visual, input_ids, embeds, text_embeds, text_mask, prune, decoder, chain,
                      new_tokens, kv)


def decoder_steps(model: VisionLanguageModel, strategy: Strategy, batch: PromptBatch, visual: torch.Tensor,
                  embeds: torch.Tensor, budget: int, position_policy: str, last_only: bool) -> list[DecoderStep]:
    """A prefill over the pruned prompt, then one step on its greedy token."""
    prompt = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, model.image_token_id, strategy,
                          budget, position_policy)
    cache = model.new_cache()
    inputs, mask, position = prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids
    steps = []
    for name in ("prefill", "decode step"):
        logits = model.decode(inputs, mask, position, cache, last_only=last_only)
        present = torch.cat([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
        feeds = {names.INPUTS_EMBEDS: inputs.numpy(), names.ATTENTION_MASK: mask.numpy(),
                 names.POSITION_IDS: position.numpy()}
        steps.append(DecoderStep(name, feeds, logits, present))
        token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        inputs = model.embed_tokens(token)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position[:, -1:] + 1
    return steps


def sample_batch(model: VisionLanguageModel, batch_size: int, seed: int = 0) -> PromptBatch:
    """Prompts of different lengths (so left padding is exercised) with seeded images."""
    rng = np.random.default_rng(seed)
    if model.processor is not None:
        images = [(rng.random((48 + 24 * i, 64 - 8 * i, 3)) * 255).astype(np.uint8) for i in range(batch_size)]
        questions = [SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)] for i in range(batch_size)]
        return model.processor(images, questions)
    config, n = model.text_config, model.num_visual_tokens  # no tokenizer: random text ids around the image
    pad = pad_token_id(model)
    rows = [rng.integers(0, config.vocab_size, 4 + 3 * i).tolist() for i in range(batch_size)]
    rows = [[t if t != model.image_token_id else pad for t in row] for row in rows]
    rows = [row[:2] + [model.image_token_id] * n + row[2:] for row in rows]
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    size = model.image_size
    pixel_values = torch.from_numpy(rng.standard_normal((batch_size, 3, size, size), dtype=np.float32))
    return PromptBatch(input_ids, attention_mask, pixel_values)
