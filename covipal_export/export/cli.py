"""`python export.py --model M --budget K`: ONNX graphs + manifest in engines/<M>-b<K>, verified against PyTorch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.models import MODEL_NAMES
from covipal.pruning import POSITION_POLICIES
from covipal.strategies import STRATEGY_NAMES
from covipal_export.build.cli import add_build_arguments, print_engines
from covipal_export.build.engines import build_engines, build_target, check_gather
from covipal_export.engine_info import import_tensorrt
from covipal_export.export.exporter import ExportOptions, VerificationFailed, describe, export_model
from covipal_export.export.onnx_export import DEFAULT_OPSET, OPSETS
from covipal_export.export.quantize import (
    BLOCK_SIZES,
    DEFAULT_BLOCKS,
    DEFAULT_CALIB,
    METHODS,
    QUANT_BITS,
    QuantOptions,
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python export.py", description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES, metavar="NAME",
                        help=f"registered model: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--budget", required=True, type=positive_int,
                        help="default number of visual tokens to keep (ppm.onnx takes any budget at run time)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: engines/<model>-b<budget>)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="default: %(default)s")
    parser.add_argument("--ppm", type=Path, default=None, help="trained PPM checkpoint directory")
    parser.add_argument("--strategy", choices=STRATEGY_NAMES, default=None, metavar="S",
                        help="scoring strategy in ppm.onnx: ppm, uniform or text-sim (default: the PPM with --ppm, "
                             "a bundled PPM, or a random PPM with --random-weights; else the training-free rule that "
                             "measured best, named in the output and the manifest)")
    parser.add_argument("--position-policy", choices=POSITION_POLICIES, default="keep",
                        help="default positions of kept tokens, recorded in the manifest (default: %(default)s)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="local checkpoint directory for a LLaVA alias (default: the Hugging Face cache)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the architecture with seeded random weights (no download), for benchmarks")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="decoder layers to keep, with --random-weights (e.g. 2 to export a 7B on a small machine)")
    parser.add_argument("--opset", type=int, choices=OPSETS, default=DEFAULT_OPSET, help="default: %(default)s")
    parser.add_argument("--logits", choices=("last", "all"), default="last",
                        help="decoder.onnx returns logits for the last position only, or for all "
                             "(default: %(default)s)")
    parser.add_argument("--kv-variant", action="store_true",
                        help="also export decoder_kv.onnx, the decoder on a compressed KV cache, so that run_trt.py "
                             "--kv-method eviction|spindlekv runs (a second copy of the decoder's weights on disk)")
    parser.add_argument("--force", action="store_true", help="replace an existing export directory")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check every graph and a greedy decode against PyTorch before keeping the export "
                             "(default: on)")
    quant = parser.add_argument_group("weight-only quantization of the decoder (activations stay in --dtype)")
    quant.add_argument("--quant", choices=tuple(QUANT_BITS), default="none",
                       help="int8 or int4 weights for the decoder's linear layers; decoder.onnx gets ONNX Runtime's "
                            "MatMulNBits, decoder.qdq.onnx the same weights as DequantizeLinear for TensorRT "
                            "(default: %(default)s)")
    quant.add_argument("--quant-block", type=int, default=None, metavar="B",
                       help=f"group size along the input dimension: {', '.join(map(str, BLOCK_SIZES))} (default: "
                            f"{DEFAULT_BLOCKS['int8']} for int8, {DEFAULT_BLOCKS['int4']} for int4)")
    quant.add_argument("--quant-method", choices=METHODS, default=None,
                       help="rtn: round to nearest on a symmetric grid, one scale a block (default with --quant); "
                            "q4_1 (int4, blocks of 32): llama.cpp's Q4_1 grid, a scale and a minimum a block, the "
                            "minimum added by a small block-offset MatMul (keeps a Q4_1 GGUF's weights exactly: "
                            "mini-llava); awq (int4): NVIDIA ModelOpt's AWQ scales, searched on --calib real prompts "
                            "in PyTorch and folded into the weights before export, then rtn; gptq (int4): ONNX "
                            "Runtime's GPTQ on --calib real prompts (in onnxruntime 1.32 it compensates nothing and "
                            "scores below rtn: docs/BENCHMARKS.md)")
    quant.add_argument("--calib", type=positive_int, default=None, metavar="N",
                       help=f"(image, question) pairs a calibrated method (awq, gptq) sees: easy-VQA train for "
                            f"mini-llava, the bundled images with generic questions otherwise (default: "
                            f"{DEFAULT_CALIB})")
    quant.add_argument("--quant-lm-head", action="store_true",
                       help="quantize the LM head too (default: it stays in --dtype)")
    parser.add_argument("--trt", action="store_true",
                        help="also build TensorRT engines into DIR/trt (tensorrt, else tensorrt_rtx)")
    add_build_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quantization = QuantOptions(args.quant, args.quant_block, args.quant_method, args.quant_lm_head, args.calib)
    if args.trt:  # refuse what cannot be built before exporting, not after
        trt = import_tensorrt(args.module)
        check_gather(args.gather, trt)
        build_target(trt, args.compute_capability)
    quiet_libraries()
    options = ExportOptions(
        model=args.model, budget=args.budget, out=args.out, dtype=args.dtype, strategy=args.strategy, ppm=args.ppm,
        position_policy=args.position_policy, model_path=args.model_path, random_weights=args.random_weights,
        layers=args.layers, opset=args.opset, logits=args.logits, force=args.force, verify=args.verify,
        quantization=quantization, kv_variant=args.kv_variant,
    )
    try:
        result = export_model(options)
    except VerificationFailed as failure:
        print(failure.report.table())
        print(f"error: {failure}; nothing was written (rerun with --no-verify to keep the graphs, then "
              f"`python -m covipal_export.export.verify DIR`)", file=sys.stderr)
        return 1
    print(describe(result))
    if result.report is not None:
        print(result.report.table())
    if args.trt:
        try:
            infos = build_engines(result.directory, module=args.module, gather=args.gather,
                                  workspace_mb=args.workspace_mb, compute_capability=args.compute_capability)
        except CovipalError as error:
            raise CovipalError(f"{error} (the export in {result.directory} is complete and runs on ONNX Runtime; "
                               f"only its engines are missing)") from None
        print_engines(infos)
    return 0


def console() -> NoReturn:
    """The `covipal-export` command (also `python export.py`)."""
    run(main)
