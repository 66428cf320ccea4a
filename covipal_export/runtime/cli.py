"""`python run_trt.py IMAGE QUESTION`: answer a question about an image from an export directory.

Streams the answer on stdout and a one-line summary on stderr (backend, tokens kept, TTFT, tokens/s);
`--json` prints one JSON object instead. Bad input: one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.models.processing import load_image
from covipal_export import names
from covipal_export.exporter import DEFAULT_ROOT
from covipal_export.runtime.pipeline import Pipeline
from covipal_export.runtime.selection import BACKENDS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python run_trt.py", description=__doc__.splitlines()[0])
    parser.add_argument("image", help="image file (PNG, JPEG, ...)")
    parser.add_argument("question")
    parser.add_argument("--engine-dir", type=Path, help=f"export directory (default: the one in {DEFAULT_ROOT}/, "
                                                        f"or the newest when there are several)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: TensorRT, else ONNX Runtime CUDA, else ONNX Runtime CPU (default: auto)")
    parser.add_argument("--budget", type=positive_int, help="visual tokens to keep (default: the manifest's)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="default: 32")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return parser


def find_engine_dir(root: Path = DEFAULT_ROOT) -> Path:
    """The only export directory under `root`, or the newest one (said on stderr)."""
    found = sorted((p.parent for p in root.glob(f"*/{names.MANIFEST_FILE}")),
                   key=lambda d: (d / names.MANIFEST_FILE).stat().st_mtime)
    if not found:
        raise CovipalError(f"no export directory in {root}/: run `python export.py --model M --budget K` "
                           f"or pass --engine-dir")
    if len(found) > 1:
        print(f"using the newest of {len(found)} exports in {root}/: {found[-1]} (pass --engine-dir to choose)",
              file=sys.stderr)
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    image = load_image(args.image)  # a missing or unreadable image fails before the (slow) load
    if not args.question.strip():
        raise CovipalError("the question is empty")
    quiet_libraries()
    pipe = Pipeline.from_dir(args.engine_dir or find_engine_dir(), backend=args.backend)
    options = dict(budget=args.budget, max_new_tokens=args.max_new_tokens)
    if args.json:
        result = pipe.generate(image, args.question, **options)
        print(json.dumps(result.to_json()))
        return 0
    stream = pipe.generate(image, args.question, stream=True, **options)
    for text in stream:
        print(text, end="", flush=True)
    print()
    result = stream.result
    print(f"{result.backend} ({result.reason}); {result.tokens_kept}/{result.tokens_total} visual tokens kept; "
          f"TTFT {result.timings_ms.ttft:.0f} ms; {result.tokens_per_second:.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
