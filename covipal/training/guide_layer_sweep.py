"""`python -m covipal.training.guide_layer_sweep`: which guide layer's attention labels are worth imitating.

The attention labels (covipal.training.attention_labels) of easy-VQA test questions, read at every
`--layers` layer in one pass, are used as an oracle selection: the visual tokens kept at each
budget are those the question attends to most at that layer, and the table is the accuracy per
layer and budget. `--answer-gradient` adds the answer-gradient teacher
(covipal.training.gradient_labels) as one more row.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import NoReturn

import torch
from tqdm import tqdm

from covipal.budget import ALL, parse_budgets
from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.models.base import VisionLanguageModel
from covipal.pruning import prune_prompt
from covipal.strategies import Strategy
from covipal.training.attention_labels import visual_attention_labels
from covipal.training.batching import answer_ids, pad_answered
from covipal.training.data import easy_vqa
from covipal.training.gradient_labels import answer_gradient_labels


class OracleScores(Strategy):
    """Scores known in advance (the labels themselves), for the sweep."""

    name = "oracle"

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.fixed = scores  # [B, N]

    def scores(self, visual_tokens, text_embeds, text_mask, budget):
        return self.fixed


def _answer_gradient(model: VisionLanguageModel, examples: list, visual_tokens: torch.Tensor) -> torch.Tensor:
    """covipal.training.gradient_labels for a batch of easy-VQA examples, `[B, N]`."""
    prompts = [model.require_processor().tokenize(e.question) for e in examples]
    input_ids, attention_mask, lengths = pad_answered(model, prompts, [answer_ids(model, e.answer) for e in examples])
    return answer_gradient_labels(model, input_ids, attention_mask, lengths, visual_tokens)


def _parse_layers(text: str) -> list[int]:
    try:
        return sorted({int(item) for item in text.split(",")})
    except ValueError:
        raise CovipalError(f"--layers takes comma-separated layer indices, got {text!r}") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal.training.guide_layer_sweep",
                            description="Guide-layer sweep: accuracy on easy-VQA test questions when the visual tokens "
                                        "kept are those the question attends to most at each layer (an oracle).")
    parser.add_argument("--model", default="mini-llava", help="registered model (default: %(default)s)")
    parser.add_argument("--layers", default="2,5,8,11,15,19,23,27",
                        help="guide layers to compare (default: %(default)s)")
    parser.add_argument("--budgets", default="64,32,16", help="visual-token budgets (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=200, help="test questions (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question subset, as in covipal.eval")
    parser.add_argument("--answer-gradient", action="store_true",
                        help="add a row for the answer-gradient labels (covipal.training.gradient_labels), which use "
                             "the answer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layers = _parse_layers(args.layers)
    budgets = parse_budgets(args.budgets, allow_all=False)
    quiet_libraries()
    from covipal.eval import answer_first_tokens
    from covipal.models import load_model

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
            full = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, model.image_token_id, None, ALL)
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
    print(f"\n{args.model}, n = {len(examples)} easy-VQA test questions, oracle = top-k attention labels",
          file=sys.stderr)
    return 0


def console() -> NoReturn:
    """`python -m covipal.training.guide_layer_sweep`."""
    run(main)


if __name__ == "__main__":
    console()
