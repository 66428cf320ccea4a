"""Scoring strategies: every one maps (visual tokens, text, budget) to scores `[B, N]`, higher = keep.

    ppm       the trained Plug-and-Play Pruning Module
    random    seeded uniform noise (same seed, same picks)
    uniform   an even stride over the raster order, exactly `k` picks for any budget
    text-sim  minus the cosine similarity of each visual token to the mean of the prompt's text embeddings:
              the tokens least like the text are kept (OpenVINO GenAI's "negative relevance" for LLaVA;
              docs/TRAINING.md#why-text-sim-scored-below-random has the measurement)
    knorm     ViTCoP's key norm: L2 norm of the mean-over-KV-heads key at an early decoder layer;
              a smaller norm means more important, so the score is the negated norm
    cdpruner  conditional-DPP greedy selection, relevance to the prompt weighted by `relevance_weight`
              (covipal.cdpruner)
    dart      pivot tokens, then the tokens least like each pivot, dropping its duplicates (covipal.dart)

cdpruner and dart select sequentially; their scores rank the picks (first pick highest, the rest 0), so
the top k of those scores are exactly the k picks.

Selection is always `covipal.selection.keep_topk_in_order` (`Strategy.select`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from covipal.budget import resolve_budget
from covipal.cdpruner import DEFAULT_RELEVANCE_WEIGHT, cdpruner_picks, check_relevance_weight
from covipal.dart import dart_picks
from covipal.errors import CovipalError
from covipal.modeling_ppm import PruningModule
from covipal.selection import keep_topk_in_order

STRATEGY_NAMES = ("ppm", "random", "uniform", "text-sim", "knorm", "cdpruner", "dart")


class Strategy(nn.Module):
    """The interface: `scores(visual_tokens [B,N,D], text_embeds [B,T,D], text_mask [B,T], budget) -> [B, N]`.

    `select` (a `covipal.pruning.Selector`) keeps the top k of those scores in order.
    """

    name: str

    def scores(self, visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
               budget: int | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """kept_index [B, k] ascending and the scores [B, N] it was picked from."""
        scores = self.scores(visual_tokens, text_embeds, text_mask, k)  # [B, N]
        return keep_topk_in_order(scores, k), scores


class PPMStrategy(Strategy):
    name = "ppm"

    def __init__(self, ppm: PruningModule):
        super().__init__()
        self.ppm = ppm

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        return self.ppm(visual_tokens, text_embeds, text_mask)  # [B, N]


class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(visual_tokens.shape[:2], generator=generator)  # [B, N], drawn on the CPU
        return noise.to(visual_tokens.device)


class UniformStrategy(Strategy):
    """Picks `floor(i * N / k)` for i in 0..k-1: score 1 on those tokens, 0 elsewhere."""

    name = "uniform"

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        num_tokens = visual_tokens.shape[1]
        k = torch.clamp(torch.as_tensor(budget, device=visual_tokens.device), max=num_tokens)
        j = torch.arange(num_tokens, device=visual_tokens.device)  # [N]
        slot = (j * k + num_tokens - 1) // num_tokens  # the first grid slot i with i * N / k >= j
        picked = (slot < k) & (slot * num_tokens < (j + 1) * k)  # slot i lands exactly on token j
        return picked.to(torch.float32).expand(visual_tokens.shape[0], -1)  # [B, N]


class TextSimilarityStrategy(Strategy):
    """Negated cosine similarity to the mean text embedding.

    In the decoder's input space every projected visual token has about the same small cosine to the text
    (mini-llava: 0.06 +- 0.016); the tokens nearest the text's direction are the plain background ones, the
    image's content points away from it. The positive sign kept background (below random on mini-llava).
    """

    name = "text-sim"

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        weights = text_mask.to(text_embeds.dtype).unsqueeze(-1)  # [B, T, 1]
        query = (text_embeds * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, D]
        return -F.cosine_similarity(visual_tokens.float(), query.float().unsqueeze(1), dim=-1)  # [B, N]


class KeyNormStrategy(Strategy):
    """ViTCoP's key-norm saliency at decoder layer `layer`, over the visual tokens alone.

    The first `layer` decoder layers run on the visual tokens (causal, positions 0..N-1); the key of
    layer `layer` is `k_proj(input_layernorm(h))`. RoPE does not change the norm, so it is skipped.
    """

    name = "knorm"

    def __init__(self, language_model: nn.Module, layer: int = 1):
        super().__init__()
        num_layers = language_model.config.num_hidden_layers
        if not 0 <= layer < num_layers:
            raise CovipalError(f"knorm layer must be in 0..{num_layers - 1}, got {layer}")
        self.language_model = language_model
        self.layer = layer

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        lm = self.language_model
        batch, num_tokens, _ = visual_tokens.shape
        hidden = visual_tokens  # [B, N, D]
        if self.layer > 0:
            from transformers.masking_utils import create_causal_mask  # loads torch._dynamo: only when needed

            position_ids = torch.arange(num_tokens, device=hidden.device).expand(batch, -1)  # [B, N]
            mask = create_causal_mask(config=lm.config, inputs_embeds=hidden,
                                      attention_mask=torch.ones(batch, num_tokens, dtype=torch.bool,
                                                                device=hidden.device),
                                      past_key_values=None, position_ids=position_ids)
            rotary = lm.rotary_emb(hidden, position_ids=position_ids)
            for decoder_layer in lm.layers[: self.layer]:
                hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=rotary,
                                       position_ids=position_ids)
        attn = lm.layers[self.layer].self_attn
        keys = attn.k_proj(lm.layers[self.layer].input_layernorm(hidden))  # [B, N, Hkv * dh]
        keys = keys.view(batch, num_tokens, -1, attn.head_dim).mean(dim=2)  # [B, N, dh], mean over KV heads
        return -keys.float().norm(dim=-1)  # [B, N]


def rank_scores(picks: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Scores `[B, N]` whose top k are the picks `[B, k]` (in pick order): k - t for the t-th pick, else 0."""
    batch, k = picks.shape
    ranks = torch.arange(k, 0, -1, dtype=torch.float32, device=picks.device).expand(batch, -1)  # [B, k]
    return torch.zeros(batch, num_tokens, device=picks.device).scatter(1, picks, ranks)


class CDPrunerStrategy(Strategy):
    """CDPruner (covipal.cdpruner): DPP over visual-token similarity, conditioned on relevance to the text."""

    name = "cdpruner"

    def __init__(self, relevance_weight: float = DEFAULT_RELEVANCE_WEIGHT, negative_relevance: bool = True):
        super().__init__()
        self.relevance_weight = check_relevance_weight(relevance_weight)
        self.negative_relevance = negative_relevance

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        k = resolve_budget(budget, visual_tokens.shape[1])
        picks = cdpruner_picks(visual_tokens, text_embeds, text_mask, k, self.relevance_weight,
                               self.negative_relevance)
        return rank_scores(picks, visual_tokens.shape[1])


class DartStrategy(Strategy):
    """DART (covipal.dart) on the input embeddings: pivots, then each pivot's least similar tokens."""

    name = "dart"

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        k = resolve_budget(budget, visual_tokens.shape[1])
        return rank_scores(dart_picks(visual_tokens, text_embeds, text_mask, k), visual_tokens.shape[1])


def make_strategy(name: str, *, language_model: nn.Module | None = None, ppm: PruningModule | None = None,
                  seed: int = 0, knorm_layer: int = 1,
                  relevance_weight: float = DEFAULT_RELEVANCE_WEIGHT) -> Strategy:
    """A strategy by name; `ppm` needs a PruningModule, `knorm` the model's decoder stack."""
    if name == "ppm":
        if ppm is None:
            raise CovipalError("strategy 'ppm' needs a trained PPM checkpoint")
        return PPMStrategy(ppm)
    if name == "random":
        return RandomStrategy(seed)
    if name == "uniform":
        return UniformStrategy()
    if name == "text-sim":
        return TextSimilarityStrategy()
    if name == "knorm":
        if language_model is None:
            raise CovipalError("strategy 'knorm' needs the model's decoder")
        return KeyNormStrategy(language_model, knorm_layer)
    if name == "cdpruner":
        return CDPrunerStrategy(relevance_weight)
    if name == "dart":
        return DartStrategy()
    raise CovipalError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}")
