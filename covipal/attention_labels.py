"""Stage-1 teacher: how much attention each visual token gets from the question at a guide layer.

For a full (unpruned) prompt the frozen decoder runs normally up to the guide layer `l_g`; at `l_g`
only, attention is computed explicitly for the query rows after the image (the question and the
chat template's tail):

    q = rope(q_proj(norm(h)))[rows]  [B, H, R, dh]     k = rope(k_proj(norm(h)))  [B, H, L, dh]
    A = softmax(q k^T / sqrt(dh) + causal and padding mask)                      [B, H, R, L]
    label[b, i] = sum over heads and rows of A[b, :, :, image_start + i]         [B, N]

Several guide layers can be read in one pass (a sweep). The decoders in the registry are Llama
style (LLaVA-1.5's Vicuna, SmolLM2), so RoPE and grouped KV heads follow transformers' Llama code.

`python -m covipal.attention_labels` runs the guide-layer sweep: the labels of test questions used
as an oracle selection, accuracy per layer and budget (which layer is worth imitating);
`--answer-gradient` adds the answer-gradient teacher (covipal.gradient_labels) as one more row.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from typing import Sequence

import torch
from tqdm import tqdm
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.models.base import VisionLanguageModel
from covipal.pruning import image_span, positions_from_mask
from covipal.strategies import Strategy


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


class OracleScores(Strategy):
    """Scores known in advance (the labels themselves), for the sweep."""

    name = "oracle"

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.fixed = scores  # [B, N]

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        return self.fixed


def _answer_gradient(model: VisionLanguageModel, examples: list, visual_tokens: torch.Tensor) -> torch.Tensor:
    """covipal.gradient_labels for a batch of easy-VQA examples, `[B, N]`."""
    from covipal.gradient_labels import answer_gradient_labels
    from covipal.train import answer_ids, pad_answered

    prompts = [model.require_processor().tokenize(e.question) for e in examples]
    input_ids, attention_mask, lengths = pad_answered(model, prompts, [answer_ids(model, e.answer) for e in examples])
    return answer_gradient_labels(model, input_ids, attention_mask, lengths, visual_tokens)


def _parse_layers(text: str) -> list[int]:
    try:
        return sorted({int(item) for item in text.split(",")})
    except ValueError:
        raise CovipalError(f"--layers takes comma-separated layer indices, got {text!r}") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal.attention_labels",
                            description="Guide-layer sweep: accuracy on easy-VQA test questions when the visual tokens "
                                        "kept are those the question attends to most at each layer (an oracle).")
    parser.add_argument("--model", default="mini-llava", help="registered model (default: %(default)s)")
    parser.add_argument("--layers", default="2,5,8,11,15,19,23,27", help="guide layers to compare (default: %(default)s)")
    parser.add_argument("--budgets", default="64,32,16", help="visual-token budgets (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=200, help="test questions (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question subset, as in covipal.eval")
    parser.add_argument("--answer-gradient", action="store_true",
                        help="add a row for the answer-gradient labels (covipal.gradient_labels), which use the answer")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    layers = _parse_layers(args.layers)
    budgets = [int(b) for b in args.budgets.split(",")]
    quiet_libraries()
    from covipal.data import easy_vqa
    from covipal.eval import answer_first_tokens
    from covipal.models import load_model
    from covipal.pruning import prune_prompt

    model = load_model(args.model)
    answers = easy_vqa.answers()
    candidates = torch.tensor(answer_first_tokens(model, answers))  # [A]
    examples = easy_vqa.sample(easy_vqa.load_split("test"), args.limit, args.seed)
    correct: Counter = Counter()
    with torch.no_grad():
        for begin in tqdm(range(0, len(examples), args.batch_size), desc="sweep", unit="batch", file=sys.stderr):
            chunk = examples[begin : begin + args.batch_size]
            batch = model.require_processor()([e.image for e in chunk], [e.question for e in chunk])
            gold = torch.tensor([answers.index(e.answer) for e in chunk])
            visual = model.encode_images(batch.pixel_values)  # [B, N, D]
            embeds = model.embed_prompt(batch.input_ids)  # [B, L, D]
            full = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, model.image_token_id, None, None)
            labels = visual_attention_labels(model, full.inputs_embeds, batch.input_ids, batch.attention_mask, layers)
            if args.answer_gradient:
                labels["answer-gradient"] = _answer_gradient(model, chunk, visual)
            for layer in labels:
                for budget in budgets:
                    prompt = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, model.image_token_id,
                                          OracleScores(labels[layer]), budget)
                    logits = model.decode(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids,
                                          model.new_cache())[:, -1]  # [B, V]
                    correct[(layer, budget)] += int((logits[:, candidates].argmax(-1) == gold).sum())
    print("| guide layer | " + " | ".join(f"k={b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for layer in layers + (["answer-gradient"] if args.answer_gradient else []):
        print(f"| {layer} | " + " | ".join(f"{100 * correct[(layer, b)] / len(examples):.1f}" for b in budgets) + " |")
    print(f"\n{args.model}, n = {len(examples)} easy-VQA test questions, oracle = top-k attention labels", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
