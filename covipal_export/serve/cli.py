"""`python -m covipal_export.serve DIR`: an OpenAI-compatible chat-completions server for one export.

    curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": [
      {"type": "text", "text": "what shape is it?"},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}], "budget": 32}'

Bad input at start: one `error: ...` line and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal_export.runtime.pipeline import Pipeline
from covipal_export.runtime.selection import BACKENDS
from covipal_export.serve.app import ServerConfig, create_app
from covipal_export.serve.request import MB, Limits


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal_export.serve", description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path, help="export directory (python export.py writes one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this box only)")
    parser.add_argument("--port", type=positive_int, default=8000, help="default: 8000")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: TensorRT, else ONNX Runtime CUDA, else ONNX Runtime CPU (default: auto)")
    parser.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--image-root", type=Path,
                        help="a directory whose image files requests may name by path (default: data URIs only)")
    parser.add_argument("--max-body-mb", type=positive_int, default=20,
                        help="larger request bodies get HTTP 413 (default: 20)")
    parser.add_argument("--max-image-mb", type=positive_int, default=16, help="largest encoded image (default: 16)")
    parser.add_argument("--max-tokens", type=positive_int, default=256,
                        help="the most new tokens a request may ask for (default: 256)")
    parser.add_argument("--default-max-tokens", type=positive_int, default=32,
                        help="new tokens when a request gives no max_tokens (default: 32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image_root is not None and not args.image_root.is_dir():
        raise CovipalError(f"--image-root is not a directory: {args.image_root}")
    import uvicorn  # after the arguments: --help needs no server

    quiet_libraries()
    pipe = Pipeline.from_dir(args.engine_dir, backend=args.backend, threads=args.threads)
    config = ServerConfig(args.image_root, args.max_body_mb * MB, args.default_max_tokens,
                          Limits(args.max_image_mb * MB, args.max_tokens))
    print(f"serving {args.engine_dir} on {pipe.backend.name} ({pipe.reason}) at http://{args.host}:{args.port}/v1")
    uvicorn.run(create_app(pipe, config), host=args.host, port=args.port, log_level="warning")
    return 0


def console() -> NoReturn:
    """The `covipal-serve` command."""
    run(main)


if __name__ == "__main__":
    console()
