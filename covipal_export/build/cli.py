"""`python -m covipal_export.build DIR`: TensorRT engines for an export directory (export on x86, build on the
device)."""

from __future__ import annotations

import argparse
from typing import NoReturn

from covipal.cli import ArgumentParser, positive_int, run
from covipal_export.build.engines import build_engines
from covipal_export.engine_info import EngineInfo
from covipal_export.memory import gib


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine-build flags, shared by this command and `export.py --trt`."""
    parser.add_argument("--gather", choices=("native", "plugin"), default="native",
                        help="keep-top-k in the PPM engine: standard TopK + Gather ops, or the custom TopKGather "
                             "plugin (full TensorRT only) (default: %(default)s)")
    parser.add_argument("--workspace-mb", type=positive_int, default=None,
                        help="cap TensorRT's builder workspace; on Jetson, whose GPU shares the board's memory, "
                             "keep it well under the free RAM, e.g. 1024 (default: TensorRT's own limit)")
    parser.add_argument("--compute-capability", default=None, metavar="X.Y",
                        help="TensorRT-RTX only: the GPU generation to build for ahead of time, e.g. 8.6 or 12.0 "
                             "(default: 8.9); full TensorRT builds for the GPU it runs on")
    parser.add_argument("--module", choices=("tensorrt", "tensorrt_rtx"), default=None,
                        help="TensorRT package to build with (default: tensorrt where it imports, else tensorrt_rtx)")


def print_engines(infos: list[EngineInfo]) -> None:
    """One line an engine: what built it, in how long, and the builder's peak memory so far."""
    for info in infos:
        print(f"  engine {info.stage:8} {info.module} {info.version} for {info.target}: {info.seconds:.1f} s, "
              f"peak RSS {gib(info.peak_rss_bytes)}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m covipal_export.build", description=__doc__)
    parser.add_argument("directory", help="an export directory (with manifest.json) made by export.py")
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    infos = build_engines(args.directory, module=args.module, gather=args.gather, workspace_mb=args.workspace_mb,
                          compute_capability=args.compute_capability)
    print_engines(infos)
    print(f"engines written to {args.directory}/trt")
    return 0


def console() -> NoReturn:
    """The `covipal-build` command."""
    run(main)
