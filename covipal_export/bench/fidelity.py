"""`python -m covipal_export.bench.fidelity`: easy-VQA accuracy of several exports side by side, and how often each
gives the first one's answer.

    for each export directory (the first is the reference, e.g. fp32; the others its int8 / int4 copies)
      for each budget: pipeline_eval.compare on the same seeded questions -> accuracy, answers
    -> agreement with the reference's answers at the same budget -> markdown table, JSON

Scoring is pipeline_eval's (and covipal.eval's): one prefill per question, the answer whose first token has the
highest logit.
"""

from __future__ import annotations

import json
from pathlib import Path

from covipal.budget import parse_budgets
from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.training.data import easy_vqa
from covipal_export.bench.pipeline_eval import compare
from covipal_export.runtime.pipeline import Pipeline
from covipal_export.runtime.selection import BACKENDS


def evaluate(directories: list[Path], budgets: list, limit: int, seed: int, backend: str,
             batch_size: int | None) -> list[dict]:
    """One row per (export, budget): accuracy and agreement with the first export's answers."""
    examples = easy_vqa.sample(easy_vqa.load_split("test"), limit, seed)
    rows, reference = [], {}
    for directory in directories:
        pipe = Pipeline.from_dir(directory, backend=backend)
        for budget in budgets:
            result = compare(pipe, examples, budget, batch_size, reference=False)
            answers = result.pipeline_answers
            reference.setdefault(result.budget, answers)
            agree = sum(a == b for a, b in zip(answers, reference[result.budget]))
            rows.append({"engine_dir": str(directory), "weights": pipe.manifest.decoder_weights(),
                         "backend": result.backend, "strategy": result.strategy, "budget": result.budget, "n": result.n,
                         "accuracy": result.pipeline_accuracy, "agreement": agree / result.n, "answers": answers})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: accuracy per (weights, budget), its difference to the first export's, agreement."""
    first = {r["budget"]: r["accuracy"] for r in rows if r["engine_dir"] == rows[0]["engine_dir"]}
    lines = ["| weights | budget | accuracy % | vs first (points) | same answer as first % |", "|---|---|---|---|---|"]
    for r in rows:
        delta = 100 * (r["accuracy"] - first[r["budget"]])
        lines.append(f"| {r['weights']} | {r['budget']} | {100 * r['accuracy']:.1f} | {delta:+.1f} | "
                     f"{100 * r['agreement']:.1f} |")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal_export.bench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dirs", nargs="+", type=Path, metavar="DIR",
                        help="export directories; the first is the reference of the agreement")
    parser.add_argument("--budgets", default="all", help="comma-separated budgets, 'all' = N (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="ort", help="default: %(default)s")
    parser.add_argument("--limit", type=positive_int, default=200, help="questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question subset, as in covipal.eval "
                                                            "(default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, help="questions per prefill (default: the export's "
                                                                "largest batch)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the rows as JSON to OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budgets = parse_budgets(args.budgets)
    for directory in args.engine_dirs:
        if not directory.is_dir():
            raise CovipalError(f"{directory} is not a directory")
    quiet_libraries()
    rows = evaluate(args.engine_dirs, budgets, args.limit, args.seed, args.backend, args.batch_size)
    print(f"{rows[0]['n']} easy-VQA test questions (seed {args.seed}), {rows[0]['strategy']} on {rows[0]['backend']}")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": args.seed, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    run(main)
