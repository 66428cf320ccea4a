"""`python -m covipal IMAGE QUESTION`: answer with pruned visual tokens, in PyTorch (the reference path)."""

from __future__ import annotations

import json
import sys
import time
from typing import NoReturn

from covipal.budget import ALL, budget_arg
from covipal.cdpruner import DEFAULT_RELEVANCE_WEIGHT
from covipal.cli import ArgumentParser, positive_int, probability, quiet_libraries, run
from covipal.kv_compression import KV_METHODS, KVConfig, kv_budget_arg
from covipal.models import MODEL_NAMES
from covipal.pruning import POSITION_POLICIES
from covipal.strategies import STRATEGY_NAMES


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal", description=__doc__)
    parser.add_argument("image", help="path of the image (any format Pillow reads)")
    parser.add_argument("question", help="the question about the image")
    parser.add_argument("--model", default="tiny-random-llava", choices=MODEL_NAMES, metavar="NAME",
                        help=f"registered model: {', '.join(MODEL_NAMES)} (default: %(default)s)")
    parser.add_argument("--model-path", default=None,
                        help="local checkpoint directory for a LLaVA alias (default: the Hugging Face cache)")
    parser.add_argument("--strategy", default="uniform", choices=STRATEGY_NAMES, metavar="S",
                        help=f"how visual tokens are scored: {', '.join(STRATEGY_NAMES)} (default: %(default)s)")
    parser.add_argument("--budget", type=budget_arg, default=ALL,
                        help=f"visual tokens to keep, or '{ALL}' for no pruning (default: %(default)s)")
    parser.add_argument("--ppm", default=None, help="PPM checkpoint directory for --strategy ppm "
                        "(default: the model's bundled PPM, e.g. mini-llava's)")
    parser.add_argument("--relevance-weight", type=probability, default=DEFAULT_RELEVANCE_WEIGHT, metavar="W",
                        help="--strategy cdpruner: weight in [0, 1] of relevance to the question against diversity "
                             "(0: diversity only, 1: relevance only; default: %(default)s, the paper's)")
    parser.add_argument("--position-policy", default="keep", choices=POSITION_POLICIES,
                        help="positions of kept tokens: keep the original ones or make them contiguous "
                             "(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and the random strategy")
    parser.add_argument("--kv-method", default="none", choices=KV_METHODS, metavar="M",
                        help=f"KV-cache compression during decode: {', '.join(KV_METHODS)} (default: %(default)s)")
    parser.add_argument("--kv-budget", type=kv_budget_arg, default=0.4,
                        help="prompt KV kept per layer on average: a fraction in (0, 1] such as 0.4, or a token "
                             "count such as 512 (default: %(default)s; ignored by --kv-method none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    from covipal.generation import SamplingConfig, generate
    from covipal.modeling_ppm import PruningModule
    from covipal.models import bundled_ppm, load_model
    from covipal.strategies import make_strategy

    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    model = load_model(args.model, path=args.model_path)
    ppm_dir = args.ppm or (bundled_ppm(args.model) if args.strategy == "ppm" else None)
    ppm = PruningModule.load(ppm_dir) if ppm_dir else None
    strategy = make_strategy(args.strategy, language_model=model.language_model, ppm=ppm, seed=args.seed,
                             relevance_weight=args.relevance_weight)
    start = time.perf_counter()
    out = generate(model, [args.image], [args.question], strategy=strategy, budget=args.budget,
                   position_policy=args.position_policy, sampling=sampling,
                   kv=KVConfig(args.kv_method, args.kv_budget))
    elapsed_ms = (time.perf_counter() - start) * 1e3
    kept = out.kept_index.shape[1]
    pruned = kept < out.num_visual_tokens
    if args.json:
        print(json.dumps({"answer": out.texts[0], "model": args.model, "strategy": args.strategy if pruned else None,
                          "tokens_kept": kept, "tokens_total": out.num_visual_tokens,
                          "kept_index": out.kept_index[0].tolist(), "new_tokens": out.sequences.shape[1],
                          "elapsed_ms": round(elapsed_ms, 1), "kv_method": args.kv_method,
                          "kv_budget": None if args.kv_method == "none" else args.kv_budget,
                          "kv_bytes": out.kv_bytes}))
    else:
        print(out.texts[0])
        how = f"{args.strategy}, positions {args.position_policy}" if pruned else "no pruning"
        print(f"[{args.model}: {kept}/{out.num_visual_tokens} visual tokens kept ({how}), "
              f"{out.sequences.shape[1]} new tokens in {elapsed_ms:.0f} ms]", file=sys.stderr)
    return 0


def console() -> NoReturn:
    """The `covipal` command (also `python -m covipal`)."""
    run(main)


if __name__ == "__main__":
    console()
