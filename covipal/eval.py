"""`python -m covipal.eval`: accuracy per (strategy, budget) on the easy-VQA test split.

Scoring: one prefill per question; the answer is the one of the 13 whose first token has the
highest logit at the last prompt position (the 13 first tokens are distinct for mini-llava).
The question subset is a seeded shuffle of the test split, so `--limit N` is the same N
questions in every run. Vision features are computed once per question and shared by every
(strategy, budget) in the run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

from covipal.budget import ALL, Budget, parse_budgets
from covipal.cdpruner import DEFAULT_RELEVANCE_WEIGHT
from covipal.cli import ArgumentParser, positive_int, probability, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.models import MODEL_NAMES
from covipal.models.base import VisionLanguageModel
from covipal.models.processing import PromptProcessor
from covipal.pruning import POSITION_POLICIES, prune_prompt
from covipal.strategies import STRATEGY_NAMES, Strategy
from covipal.training.data import easy_vqa


@dataclass
class EvalRecord:
    strategy: str  # "none" for the full-token row
    budget: Budget  # ALL for no pruning
    accuracy: float  # 0..1
    n: int


def answer_first_tokens(source: VisionLanguageModel | PromptProcessor, answers: list[str]) -> list[int]:
    """The first token of each answer as it continues the assistant prompt (a model's processor, or a processor)."""
    processor = source if isinstance(source, PromptProcessor) else source.require_processor()
    tokenizer = processor.tokenizer
    prompt = processor.render("?")
    separator = "" if prompt[-1].isspace() else " "
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    firsts = []
    for answer in answers:
        ids = tokenizer(prompt + separator + answer, add_special_tokens=False)["input_ids"]
        firsts.append(ids[len(prompt_ids)])
    return firsts


@torch.no_grad()
def predict(
    model: VisionLanguageModel,
    examples: list[easy_vqa.VQAExample],
    strategies: dict[str, Strategy],
    budgets: list[int],
    answers: list[str],
    position_policy: str = "keep",
    batch_size: int = 16,
    baseline: bool = True,
) -> dict[tuple[str, Budget], list[int]]:
    """The predicted answer (index into `answers`) of every question, without pruning (("none", ALL), first,
    unless not `baseline`) and for every (strategy, budget); one vision pass per batch."""
    candidates = torch.tensor(answer_first_tokens(model, answers))  # [A]
    configs = ([("none", ALL)] if baseline else []) + [(name, budget) for name in strategies for budget in budgets]
    predictions: dict[tuple[str, Budget], list[int]] = {config: [] for config in configs}
    processor = model.require_processor()
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", unit="batch", file=sys.stderr):
        chunk = examples[start : start + batch_size]
        batch = processor([e.image for e in chunk], [e.question for e in chunk])
        visual = model.encode_images(batch.pixel_values)  # [B, N, D]
        embeds = model.embed_prompt(batch.input_ids)  # [B, L, D]
        for name, budget in configs:
            prompt = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, model.image_token_id,
                                  strategies.get(name), budget, position_policy)
            logits = model.decode(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids,
                                  model.new_cache())[:, -1]  # [B, V]
            predictions[(name, budget)] += logits[:, candidates].argmax(-1).tolist()  # [B]
    return predictions


def accuracy(predicted: list[int], examples: list[easy_vqa.VQAExample], answers: list[str]) -> float:
    """The share of questions whose predicted answer index is the gold answer's."""
    return sum(answers[p] == e.answer for p, e in zip(predicted, examples)) / len(examples)


def evaluate(
    model: VisionLanguageModel,
    examples: list[easy_vqa.VQAExample],
    strategies: dict[str, Strategy],
    budgets: list[int],
    answers: list[str],
    position_policy: str = "keep",
    batch_size: int = 16,
) -> list[EvalRecord]:
    """Accuracy without pruning, then for every (strategy, budget); one vision pass per batch."""
    predictions = predict(model, examples, strategies, budgets, answers, position_policy, batch_size)
    return [EvalRecord(name, budget, accuracy(predicted, examples, answers), len(examples))
            for (name, budget), predicted in predictions.items()]


def format_table(records: list[EvalRecord], majority: tuple[str, float]) -> str:
    """Strategies as rows, budgets as columns, the full-token and majority baselines beside them."""
    full = next(r for r in records if r.budget == ALL)
    budgets = list(dict.fromkeys(r.budget for r in records if r.budget != ALL))
    strategies = list(dict.fromkeys(r.strategy for r in records if r.budget != ALL))
    by_key = {(r.strategy, r.budget): r.accuracy for r in records}
    header = ["strategy"] + [f"k={b}" for b in budgets] + ["all tokens", "majority"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in strategies:
        cells = [name] + [f"{100 * by_key[(name, b)]:.1f}" for b in budgets]
        lines.append("| " + " | ".join(cells + [f"{100 * full.accuracy:.1f}", f"{100 * majority[1]:.1f}"]) + " |")
    if not strategies:
        lines.append(f"| (none) | {100 * full.accuracy:.1f} | {100 * majority[1]:.1f} |")
    return "\n".join(lines) + f"\n\nn = {full.n} questions; majority answer '{majority[0]}'; accuracy in %"


def plot_accuracy(records: list[EvalRecord], majority: tuple[str, float], title: str, path: Path) -> None:
    """Accuracy against the visual-token budget, one line per strategy, the baselines as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CovipalError("--plot needs matplotlib: pip install matplotlib (or the project's `tools` extra)") from None
    full = next(r for r in records if r.budget == ALL)
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in dict.fromkeys(r.strategy for r in records if r.budget != ALL):
        points = sorted((r.budget, 100 * r.accuracy) for r in records if r.strategy == name and r.budget != ALL)
        axes.plot(*zip(*points), marker="o", label=name)
    axes.axhline(100 * full.accuracy, color="black", linestyle="--", label="all tokens")
    axes.axhline(100 * majority[1], color="gray", linestyle=":", label=f"majority ('{majority[0]}')")
    axes.set_xscale("log", base=2)
    budgets = sorted({r.budget for r in records if r.budget != ALL})
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.set_xlabel("visual tokens kept")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in STRATEGY_NAMES:
            raise CovipalError(f"unknown strategy {name!r}; choose from: {', '.join(STRATEGY_NAMES)}")
    return names


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mini-llava", choices=MODEL_NAMES, metavar="NAME",
                        help=f"registered model: {', '.join(MODEL_NAMES)} (default: %(default)s)")
    parser.add_argument("--data", default="easy-vqa", choices=["easy-vqa"],
                        help="evaluation data (easy-vqa test split)")
    parser.add_argument("--budgets", default="all,64,32,16",
                        help="comma-separated visual-token budgets; 'all' = no pruning (default: %(default)s)")
    parser.add_argument("--strategies", default="uniform", help=f"comma-separated, from: {', '.join(STRATEGY_NAMES)}")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate N questions (default: all 9,673)")
    parser.add_argument("--ppm", default=None, help="PPM checkpoint directory for the ppm strategy "
                        "(default: the model's bundled PPM, e.g. mini-llava's)")
    parser.add_argument("--relevance-weight", type=probability, default=DEFAULT_RELEVANCE_WEIGHT, metavar="W",
                        help="cdpruner: weight in [0, 1] of relevance to the question against diversity "
                             "(default: %(default)s, the paper's)")
    parser.add_argument("--position-policy", default="keep", choices=POSITION_POLICIES, help="default: %(default)s")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question subset and the random strategy")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the table as JSON to OUT")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                        help="also plot accuracy against budget per strategy (needs matplotlib)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budgets = parse_budgets(args.budgets)
    strategy_names = parse_strategies(args.strategies)
    quiet_libraries()
    from covipal.modeling_ppm import PruningModule
    from covipal.models import bundled_ppm, load_model
    from covipal.strategies import make_strategy

    model = load_model(args.model)
    ppm_dir = args.ppm or (bundled_ppm(args.model) if "ppm" in strategy_names else None)
    ppm = PruningModule.load(ppm_dir) if ppm_dir else None
    strategies = {name: make_strategy(name, language_model=model.language_model, ppm=ppm, seed=args.seed,
                                      relevance_weight=args.relevance_weight)
                  for name in strategy_names}
    answers = easy_vqa.answers()
    examples = easy_vqa.sample(easy_vqa.load_split("test"), args.limit, args.seed)
    majority = easy_vqa.majority_answer(easy_vqa.load_split("train"))
    majority_accuracy = sum(e.answer == majority for e in examples) / len(examples)

    start = time.perf_counter()
    records = evaluate(model, examples, strategies, [b for b in budgets if b != ALL], answers,
                       args.position_policy, args.batch_size)
    elapsed = time.perf_counter() - start
    print(format_table(records, (majority, majority_accuracy)))
    print(f"{args.model}, positions {args.position_policy}, {elapsed:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "data": "easy-vqa test", "position_policy": args.position_policy, "seed": args.seed,
            "records": [asdict(r) for r in records],
            "baselines": {"all_tokens": records[0].accuracy,
                          "majority": {"answer": majority, "accuracy": majority_accuracy}},
        }, indent=2) + "\n")
    if args.plot:
        title = f"{args.model} on easy-VQA test (n = {len(examples)}), positions {args.position_policy}"
        plot_accuracy(records, (majority, majority_accuracy), title, args.plot)
    return 0


def console() -> NoReturn:
    """The `covipal-eval` command (also `python -m covipal.eval`)."""
    run(main)


if __name__ == "__main__":
    console()
