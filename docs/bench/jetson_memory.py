"""Weights plus KV cache of exports against Jetson Orin memory, computed from their manifests alone.

    PYTHONPATH=$PWD .venv/bin/python docs/bench/jetson_memory.py DIR [DIR ...] [--budgets 576,128]

For each export directory and budget k:
- weights: the ONNX files TensorRT builds on the board (`Manifest.trt_graph_file`: decoder.qdq.onnx for a
  quantized decoder, the graph otherwise), with their external data, as the manifest lists them;
- KV cache: 2 (key, value) x layers x KV heads x head dim x bytes of the export dtype, for each token of the
  context at batch 1: the k kept visual tokens, `--text` prompt tokens and `--generated` tokens;
- the sum against the unified memory of Orin Nano 8 GB, Orin NX 16 GB and AGX Orin 64 GB, which the GPU shares
  with the OS and everything else on the board.
Engine sizes and TensorRT's workspace are not in it (they need the board), nor activations.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from covipal_export import names
from covipal_export.manifest import Manifest, load_manifest

BOARDS = {"Orin Nano 8 GB": 8e9, "Orin NX 16 GB": 16e9, "AGX Orin 64 GB": 64e9}
DTYPE_BYTES = {"fp32": 4, "fp16": 2}
GB = 1e9


def weight_bytes(manifest: Manifest) -> int:
    """Bytes of the graphs TensorRT builds, external data included."""
    total = 0
    for stage in names.STAGES:
        file = manifest.trt_graph_file(stage)
        total += sum(manifest.files[f].bytes for f in (file, f"{file}.data") if f in manifest.files)
    return total


def kv_bytes(manifest: Manifest, tokens: int) -> int:
    decoder = manifest.decoder
    return 2 * decoder.num_layers * decoder.num_kv_heads * decoder.head_dim * DTYPE_BYTES[manifest.model.dtype] * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path, help="export directories (with manifest.json)")
    parser.add_argument("--budgets", default="576,128", help="visual tokens kept (default: %(default)s)")
    parser.add_argument("--text", type=int, default=64, help="prompt text tokens (default: %(default)s)")
    parser.add_argument("--generated", type=int, default=256, help="generated tokens (default: %(default)s)")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"batch 1, context = k visual + {args.text} text + {args.generated} generated tokens; GB = 10^9 bytes\n")
    print("| export | decoder | k | weights GB | KV GB | total GB | " + " | ".join(BOARDS) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(BOARDS))
    for directory in args.directories:
        manifest = load_manifest(directory)
        weights = weight_bytes(manifest)
        layers = f"{manifest.model.name}, {manifest.decoder.num_layers} layers"
        for k in budgets:
            kv = kv_bytes(manifest, k + args.text + args.generated)
            total = weights + kv
            fits = [f"{100 * total / memory:.0f}%" for memory in BOARDS.values()]
            print(f"| {layers} | {manifest.decoder_weights()} | {k} | {weights / GB:.2f} | {kv / GB:.3f} | "
                  f"{total / GB:.2f} | " + " | ".join(fits) + " |")


if __name__ == "__main__":
    main()
