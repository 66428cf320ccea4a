"""`python -m covipal_export.triton DIR --out REPO`: a Triton model repository for an export directory.

Two Python-backend models: `covipal` (dynamic batching onto the Pipeline's batched generate) and
`covipal_stream` (decoupled: text pieces as they are decoded). Serve it with `tritonserver
--model-repository REPO` (NVIDIA's container or JetPack build), or here with
`python -m covipal_export.triton.local REPO` (the server bundled with nvidia-pytriton).
Bad input: one `error: ...` line and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from covipal.cli import ArgumentParser, positive_int, run
from covipal_export.runtime.selection import BACKENDS
from covipal_export.triton.repository import MODEL, STREAM_MODEL, RepositoryOptions, write_repository


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal_export.triton", description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path, help="export directory (python export.py writes one)")
    parser.add_argument("--out", type=Path, required=True, help="the repository to write (new or empty)")
    parser.add_argument("--instances", type=positive_int, default=1,
                        help="model instances of the batched model, each with its own Pipeline (default: 1)")
    parser.add_argument("--stream-instances", type=positive_int, default=1,
                        help="instances of the streaming model (default: 1)")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="Triton's max_batch_size, at most the export's; 1 turns dynamic batching off (default: 8)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000,
                        help="how long the dynamic batcher waits to fill a batch, in microseconds (default: 2000)")
    parser.add_argument("--backend", choices=[b for b in BACKENDS if b != "torch"], default="auto",
                        help="the Pipeline's backend in each instance (default: auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads per instance (default: 0, its own choice)")
    parser.add_argument("--copy", action="store_true",
                        help="copy the export into the repository (default: reference it by absolute path)")
    parser.add_argument("--max-image-mb", type=positive_int, default=16, help="largest encoded image (default: 16)")
    parser.add_argument("--max-tokens", type=positive_int, default=256,
                        help="the most new tokens a request may ask for (default: 256)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = write_repository(RepositoryOptions(args.engine_dir, args.out, args.instances, args.max_batch, args.backend,
                                             args.copy, args.threads, args.max_queue_delay_us, args.max_image_mb,
                                             args.max_tokens, args.stream_instances))
    print(f"wrote {out}: models {MODEL} (max batch {args.max_batch}) and {STREAM_MODEL} (decoupled); "
          f"serve it with tritonserver --model-repository {out}")
    return 0


def console() -> NoReturn:
    """The `covipal-triton` command."""
    run(main)


if __name__ == "__main__":
    console()
