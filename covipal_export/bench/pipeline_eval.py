"""`python -m covipal_export.bench.pipeline_eval`: easy-VQA accuracy of an export directory, scored like `covipal.eval`.

The questions are `covipal.eval`'s seeded subset (`--limit N --seed S` picks the same N), and the scoring is the
same: one prefill per question, the answer is the one of the 13 whose first token has the highest logit at the last
prompt position. The prefill runs through `Pipeline` on any backend, at the directory's budget or `--budget K`.
`--compare` also runs `covipal.eval.predict` (the core of `evaluate`) on the model and strategy the directory was
exported from (rebuilt as the torch backend does) at the same budget, position policy and batches, and counts the
questions whose answers differ.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

from tqdm import tqdm

from covipal.budget import Budget, budget_arg
from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.eval import accuracy, answer_first_tokens, predict
from covipal.training.data import easy_vqa
from covipal_export.names import DEFAULT_ROOT
from covipal_export.runtime.export_dir import find_engine_dir
from covipal_export.runtime.pipeline import Pipeline
from covipal_export.runtime.reference import reference_from_manifest
from covipal_export.runtime.selection import BACKENDS


@dataclass
class Comparison:
    """The pipeline's answers next to the PyTorch harness's on the same questions (answers as indices)."""

    backend: str
    strategy: str
    budget: int
    position_policy: str
    n: int
    pipeline_accuracy: float  # 0..1
    pipeline_answers: list[int]
    reference_accuracy: float | None = None  # covipal.eval at the same strategy and budget (--compare)
    reference_answers: list[int] | None = None

    @property
    def differ(self) -> int | None:
        """Questions whose predicted answers differ, when compared."""
        if self.reference_answers is None:
            return None
        return sum(a != b for a, b in zip(self.pipeline_answers, self.reference_answers))


def pipeline_answers(pipe: Pipeline, examples: list[easy_vqa.VQAExample], answers: list[str], budget: int,
                     batch_size: int) -> list[int]:
    """Each question's predicted answer (index into `answers`), in batches like covipal.eval's."""
    candidates = answer_first_tokens(pipe.processor, answers)  # [A]
    predicted: list[int] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"pipeline ({pipe.backend.name})", unit="batch",
                      file=sys.stderr):
        chunk = examples[start : start + batch_size]
        logits = pipe.first_token_logits([e.image for e in chunk], [e.question for e in chunk], budget=budget)
        predicted += logits[:, candidates].argmax(-1).tolist()  # [B]
    return predicted


def compare(pipe: Pipeline, examples: list[easy_vqa.VQAExample], budget: Budget | None = None,
            batch_size: int | None = None, reference: bool = True) -> Comparison:
    """The pipeline's accuracy and, with `reference`, covipal.eval's on the same questions, strategy, budget and
    batches (batch_size None: the export's largest batch)."""
    answers = easy_vqa.answers()
    pruning = pipe.manifest.pruning
    batch_size = batch_size or pipe.manifest.shapes.max_batch
    budget = pipe.resolve_budget(budget)
    ours = pipeline_answers(pipe, examples, answers, budget, batch_size)
    result = Comparison(pipe.backend.name, pruning.strategy, budget, pruning.position_policy, len(examples),
                        accuracy(ours, examples, answers), ours)
    if reference:
        model, strategy = reference_from_manifest(pipe.manifest)
        predictions = predict(model, examples, {pruning.strategy: strategy}, [budget], answers,
                              pruning.position_policy, batch_size, baseline=False)
        result.reference_answers = predictions[(pruning.strategy, budget)]
        result.reference_accuracy = accuracy(result.reference_answers, examples, answers)
    return result


def report(result: Comparison, directory: Path, seed: int) -> str:
    lines = [f"{directory} on {result.backend}: {result.strategy}, budget {result.budget}, positions "
             f"{result.position_policy}; {result.n} easy-VQA test questions (seed {seed})",
             f"  pipeline accuracy      {100 * result.pipeline_accuracy:.1f} %"]
    if result.reference_answers is not None:
        lines += [f"  PyTorch accuracy       {100 * result.reference_accuracy:.1f} %  (covipal.eval, same questions, "
                  f"strategy, budget)",
                  f"  answers that differ    {result.differ} of {result.n}"]
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal_export.bench.pipeline_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", type=Path, help=f"export directory (default: the one in {DEFAULT_ROOT}/, "
                                                        f"or the newest when there are several)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="default: %(default)s")
    parser.add_argument("--budget", type=budget_arg, help="visual tokens to keep, or 'all' (default: the manifest's)")
    parser.add_argument("--limit", type=positive_int, default=200, help="questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question subset, as in covipal.eval "
                                                            "(default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, help="questions per prefill, on both sides of --compare "
                                                                "(default: the export's largest batch)")
    parser.add_argument("--compare", action="store_true",
                        help="also run covipal.eval's PyTorch harness on the same questions, strategy and budget")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the result as JSON to OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    directory = args.engine_dir or find_engine_dir()
    # covipal.eval's batches, bit for bit: every row encoded and prefilled whole
    pipe = Pipeline.from_dir(directory, backend=args.backend, vision_cache_mb=0, prefix_cache_mb=0)
    examples = easy_vqa.sample(easy_vqa.load_split("test"), args.limit, args.seed)
    result = compare(pipe, examples, args.budget, args.batch_size, reference=args.compare)
    print(report(result, directory, args.seed))
    if args.json:
        args.json.write_text(json.dumps({"engine_dir": str(directory), "seed": args.seed, **asdict(result),
                                         "differ": result.differ}) + "\n")
    return 0


def console() -> NoReturn:
    """The `covipal-pipeline-eval` command."""
    run(main)


if __name__ == "__main__":
    console()
