"""`python run_trt.py IMAGE QUESTION`: answer a question about an image from an export directory.

Streams the answer on stdout and a one-line summary on stderr (backend, tokens kept, TTFT, tokens/s);
`--json` prints one JSON object instead. `--compare-unpruned` answers again without pruning in the same
process and says what pruning saved. A video (`run_trt.py VIDEO.mp4 QUESTION --every SECONDS`) is answered
frame by frame: one `[mm:ss.s] answer` line per sampled frame (`--json`: one object per frame, a line each).
`--kv-method eviction|spindlekv --kv-budget B` compresses the KV cache during decode (an export made with
`--kv-variant`; ONNX Runtime or torch); `--json` reports `kv_bytes`, the KV bytes held during decode.
Bad input: one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import NoReturn

from covipal.budget import ALL, budget_arg
from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.kv_compression import KV_METHODS, KVConfig, kv_budget_arg
from covipal.models.processing import load_image
from covipal_export import names
from covipal_export.runtime.export_dir import find_engine_dir
from covipal_export.runtime.pipeline import GenerationResult, Pipeline
from covipal_export.runtime.selection import BACKENDS
from covipal_export.runtime.video import SUFFIXES, is_video, sample_frames


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python run_trt.py", description=__doc__.splitlines()[0])
    parser.add_argument("image", help=f"image file (PNG, JPEG, ...), or a video ({', '.join(SUFFIXES)}, or any file "
                                      f"with --every)")
    parser.add_argument("question")
    parser.add_argument("--engine-dir", type=Path, help=f"export directory (default: the one in {names.DEFAULT_ROOT}/, "
                                                        f"or the newest when there are several)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: TensorRT, else ONNX Runtime CUDA, else ONNX Runtime CPU (default: auto)")
    parser.add_argument("--budget", type=budget_arg,
                        help=f"visual tokens to keep, at most the export's N, or '{ALL}' for no pruning "
                             f"(default: the manifest's)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="default: 32")
    parser.add_argument("--compare-unpruned", action="store_true",
                        help="also answer with every visual token kept, and print the prefill time pruning saved")
    parser.add_argument("--kv-method", default="none", choices=KV_METHODS, metavar="M",
                        help=f"KV-cache compression during decode: {', '.join(KV_METHODS)}; eviction and spindlekv "
                             f"need an export made with --kv-variant (default: %(default)s)")
    parser.add_argument("--kv-budget", type=kv_budget_arg, default=0.4,
                        help="prompt KV kept per layer on average: a fraction in (0, 1] such as 0.4, or a token "
                             "count such as 512 (default: %(default)s; ignored by --kv-method none)")
    parser.add_argument("--every", type=positive_seconds, metavar="SECONDS",
                        help="answer about one video frame per SECONDS (default for a video: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text "
                                                            "(a video: one per frame)")
    return parser


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.every is not None or is_video(args.image):
        return answer_video(args)
    image = load_image(args.image)  # a missing or unreadable image fails before the (slow) load
    if not args.question.strip():
        raise CovipalError("the question is empty")
    quiet_libraries()
    pipe = Pipeline.from_dir(args.engine_dir or find_engine_dir(), backend=args.backend)
    options = dict(budget=args.budget, max_new_tokens=args.max_new_tokens, kv=KVConfig(args.kv_method, args.kv_budget))
    if args.json:
        result = pipe.generate(image, args.question, **options)
        report = result.to_json()
        if args.compare_unpruned:
            pruned, unpruned = compare_unpruned(pipe, image, args.question, options)
            report["compare_unpruned"] = {"pruned": pruned.to_json(), "unpruned": unpruned.to_json()}
        print(json.dumps(report))
        return 0
    stream = pipe.generate(image, args.question, stream=True, **options)
    for text in stream:
        print(text, end="", flush=True)
    print()
    result = stream.result
    weights = f"decoder {result.quantization.summary()}; " if result.quantization else ""
    kv = f"{result.kv.method} {result.kv.budget:g}" if result.kv.method != "none" else "full"
    print(f"{result.backend} ({result.reason}); {weights}{result.tokens_kept}/{result.tokens_total} visual tokens "
          f"kept; TTFT {result.timings_ms.ttft:.0f} ms; {result.tokens_per_second:.1f} tokens/s; KV cache ({kv}) "
          f"{result.kv_bytes / 2**20:.2f} MiB", file=sys.stderr)
    if args.compare_unpruned:
        print(savings(*compare_unpruned(pipe, image, args.question, options)), file=sys.stderr)
    return 0


def answer_video(args: argparse.Namespace) -> int:
    """One answer per sampled frame, with its time in the video; frames are decoded as the answers go."""
    if args.compare_unpruned:
        raise CovipalError("--compare-unpruned takes an image, not a video")
    if not args.question.strip():
        raise CovipalError("the question is empty")
    frames = sample_frames(args.image, args.every or 1.0)
    first = next(frames, None)  # a video that does not open fails before the (slow) load
    if first is None:
        raise CovipalError(f"{args.image} has no frames")
    quiet_libraries()
    pipe = Pipeline.from_dir(args.engine_dir or find_engine_dir(), backend=args.backend)
    kv = KVConfig(args.kv_method, args.kv_budget)
    for index, (seconds, frame) in enumerate(itertools.chain([first], frames)):
        result = pipe.generate(frame, args.question, budget=args.budget, max_new_tokens=args.max_new_tokens, kv=kv)
        if args.json:
            print(json.dumps({"time_s": round(seconds, 3), "frame": index, **result.to_json()}), flush=True)
        else:
            minutes, rest = divmod(seconds, 60)
            print(f"[{int(minutes):02d}:{rest:04.1f}] {result.answer}", flush=True)
    return 0


def compare_unpruned(pipe: Pipeline, image, question: str, options: dict) -> tuple[GenerationResult, GenerationResult]:
    """The same call without pruning, then with pruning again, both after the first (warm-up) call."""
    unpruned = pipe.generate(image, question, **{**options, "budget": ALL})
    return pipe.generate(image, question, **options), unpruned


def savings(pruned: GenerationResult, unpruned: GenerationResult) -> str:
    """One line: tokens kept, prefill and TTFT pruned against unpruned, and whether the answers agree."""
    ratio = unpruned.timings_ms.prefill / pruned.timings_ms.prefill if pruned.timings_ms.prefill else 0.0
    same = "the same answer" if pruned.answer == unpruned.answer else f"unpruned answer: {unpruned.answer!r}"
    return (f"pruning kept {pruned.tokens_kept} of {pruned.tokens_total} visual tokens: prefill "
            f"{pruned.timings_ms.prefill:.0f} ms against {unpruned.timings_ms.prefill:.0f} ms unpruned "
            f"({ratio:.1f}x faster), TTFT {pruned.timings_ms.ttft:.0f} ms against {unpruned.timings_ms.ttft:.0f} ms; "
            f"{same}")


def console() -> NoReturn:
    """The `covipal-run` command."""
    run(main)


if __name__ == "__main__":
    console()
