"""`manifest.json`: the one contract between export and runtime, and its strict loader.

One manifest per export directory. It names every file (with its sha256), every graph's inputs and
outputs (names, dtypes, symbolic dims), the shapes export was made for, the pruning defaults, the
image preprocessing, the tokenizer files and chat template, the special token ids and the versions
that made it. A runtime needs nothing else. Example (abridged):

    {"format_version": 1,
     "model": {"name": "tiny-random-llava", "dtype": "fp32", "num_visual_tokens": 64, ...},
     "pruning": {"strategy": "ppm", "default_budget": 8, "position_policy": "keep", ...},
     "shapes": {"max_batch": 8, "visual_tokens": 64, "max_text": 448, "max_context": 512},
     "graphs": {"prune": {"file": "ppm.onnx", "external_data": null,
                          "inputs": [{"name": "budget", "dtype": "int64", "shape": []}, ...],
                          "outputs": [{"name": "kept_index", "dtype": "int64", "shape": ["batch", "kept"]}, ...]},
                ...},
     "decoder": {"logits": "last", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16},
     "files": {"ppm.onnx": {"sha256": "9f2c...", "bytes": 5021339}, "tokenizer/tokenizer.json": ...}, ...}

The loader is strict (`covipal_export.records`): an unknown or a missing key is an error naming the key and the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from covipal.errors import CovipalError
from covipal.models.processing import ImagePreprocessing
from covipal_export import names
from covipal_export.records import from_json, read_json, write_record

FORMAT_VERSION = 1


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy's name: "float32", "float16", "int64"
    shape: list[int | str]  # an int is a fixed size, a str a symbolic dimension (names.BATCH, ...)


@dataclass
class GraphSpec:
    file: str
    external_data: str | None  # the weights file next to `file`, for graphs with large weights (over 128 MiB)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)


@dataclass
class ModelSpec:
    """Which model was exported, and its dimensions."""

    name: str  # registry name (`--model`)
    source: str  # where the weights came from
    path: str | None  # the local checkpoint directory it was loaded from, if any
    random_weights: bool
    seed: int  # torch's seed while the model was built (what makes random weights reproducible)
    dtype: Literal["fp32", "fp16"]
    hidden_size: int  # D
    vocab_size: int  # V
    image_size: int  # S
    num_visual_tokens: int  # N
    image_token_id: int
    random_init: str | None = None  # how random weights were made (ModelInfo.random_init); None: the model built whole


@dataclass
class PPMSpec:
    """Where the exported PPM came from: a checkpoint, or seeded random weights (random models)."""

    checkpoint: str | None
    seed: int | None
    config: dict[str, int]  # covipal.modeling_ppm.PPMConfig fields


@dataclass
class PruningSpec:
    strategy: str  # a covipal strategy name
    ppm: PPMSpec | None  # set when strategy == "ppm"
    default_budget: int
    position_policy: Literal["keep", "compact"]  # the default; both work with the same graphs
    note: str  # how the strategy was chosen, e.g. a fallback


@dataclass
class ShapeRanges:
    """The shapes the graphs are exported for; torch.export checks the graphs hold over these ranges."""

    max_batch: int
    visual_tokens: int  # N, fixed by the image size
    max_text: int  # text tokens the pruner reads: max_context - N
    max_context: int  # prompt (after pruning) + generated tokens: the decoder's position limit


@dataclass
class DecoderSpec:
    logits: Literal["last", "all"]  # logits for the last position only ([B, 1, V]) or for all ([B, S, V])
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass
class QuantizationSpec:
    """How decoder.onnx's weights were quantized (weight-only; activations stay in the model dtype)."""

    bits: int  # 4 or 8
    block_size: int  # group size along each weight's input dimension
    method: str  # "rtn": round to nearest; "q4_1": llama.cpp's Q4_1 grid; "gptq": ONNX Runtime's GPTQ, calibrated
    symmetric: bool  # the grid is centred on zero (q4_1's is not: its block minimum is an offset; no form has zero
    # points, which TensorRT's dequantize takes none of)
    accuracy_level: int  # MatMulNBits' compute type in ONNX Runtime (4: int8 activations inside the kernel)
    layers: str  # which MatMuls, in words
    quantized_matmuls: list[str]  # the MatMul nodes of the export-dtype graph that were quantized
    lm_head: bool
    calibration: dict[str, str | int] | None  # {"data": in words, "count": pairs} for gptq; None for rtn
    library: str  # the quantizer, with its version
    trt_file: str  # the TensorRT form: the same weights as DequantizeLinear -> MatMul (decoder.qdq.onnx)
    block_offsets: bool = False  # each quantized MatMul has a block-offset MatMul beside it (q4_1's minimum)

    def summary(self) -> str:
        """"int4 rtn, block 32" (", LM head too" when it is quantized)."""
        return f"int{self.bits} {self.method}, block {self.block_size}" + (", LM head too" if self.lm_head else "")


@dataclass
class KVVariantSpec:
    """decoder_kv.onnx (`export.py --kv-variant`): the decoder on a KV cache compressed per layer and head on the host.

    Its past keys (post-RoPE) and values have a length per layer (`past_<i>`) and a mask per query head
    `past_mask.<i> [B, Hq, past_<i>]` in place of one attention mask, so each layer and head may hold other
    tokens. Each pass returns the new tokens' keys (post- and pre-RoPE) and values, and the last `window`
    queries of every layer, from which the host computes SnapKV scores (`covipal.kv_compression`).
    """

    graph: GraphSpec
    methods: list[str]  # the KV methods (covipal.kv_compression.KV_METHODS) the runtime may run on it
    num_attention_heads: int  # Hq
    window: int  # query rows returned per layer: the most a KV config's window may be
    scaling: float  # attention's softmax scale (1/sqrt(Dh))
    rope_inv_freq: list[float]  # [Dh/2] the rotary embedding's inverse frequencies: rebuilt keys are RoPE'd on the host
    rope_attention_scaling: float  # the rotary embedding's factor on cos and sin


@dataclass
class TokenizerSpec:
    directory: str  # the tokenizer files (transformers' save_pretrained layout), relative to the manifest
    chat_template: str  # Jinja, rendered with messages=[{"role": "user", "content": [image, text]}]
    image_token: str  # the placeholder the template emits; expanded to num_image_tokens copies
    num_image_tokens: int
    add_special_tokens: bool  # let the tokenizer add BOS when tokenizing the rendered prompt


@dataclass
class SpecialTokens:
    image: int
    bos: int | None
    eos: list[int]  # generation stops at any of these
    pad: int  # left padding, and the filler after a row stopped


@dataclass
class Versions:
    covipal_export: str
    torch: str
    transformers: str
    onnx: str
    onnxscript: str
    opset: int
    exporter: str


@dataclass
class FileEntry:
    sha256: str
    bytes: int


@dataclass
class StepResources:
    seconds: float
    peak_rss_bytes: int  # the process's resident high-water mark at the end of the step (it only grows)


@dataclass
class Resources:
    """What making the export took, measured by the process that made it."""

    seconds: float
    peak_rss_bytes: int  # the process's resident high-water mark: loading, export, quantization and verification
    steps: dict[str, StepResources]
    machine: str  # "2 CPUs, 23.4 GiB RAM"


@dataclass
class Manifest:
    format_version: int
    model: ModelSpec
    pruning: PruningSpec
    shapes: ShapeRanges
    graphs: dict[str, GraphSpec]  # names.STAGES -> graph
    decoder: DecoderSpec
    preprocessing: ImagePreprocessing | None  # None: the model came without an image processor
    tokenizer: TokenizerSpec | None  # None: the model came without a tokenizer
    special_tokens: SpecialTokens
    versions: Versions
    files: dict[str, FileEntry]  # every file of the directory but the manifest, by relative path
    quantization: QuantizationSpec | None = None  # None: the decoder's weights are in the model dtype
    kv_variant: KVVariantSpec | None = None  # None: exported without --kv-variant (no KV compression at run time)
    resources: Resources | None = None  # None: written before it was recorded, or quantized in a copy since

    def graph_path(self, directory: Path, stage: str) -> Path:
        return Path(directory) / self.graphs[stage].file

    def decoder_weights(self) -> str:
        """The decoder's weights in words: the model dtype ("fp32"), or the quantization ("int4 rtn, block 32")."""
        return self.quantization.summary() if self.quantization else self.model.dtype

    def trt_graph_file(self, stage: str) -> str:
        """The graph TensorRT builds for `stage`: the QDQ form of a quantized decoder, else the graph itself."""
        if stage == names.DECODER and self.quantization is not None:
            return self.quantization.trt_file
        return self.graphs[stage].file


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under `directory` except the manifest, by relative POSIX path."""
    directory = Path(directory)
    return {path.relative_to(directory).as_posix(): FileEntry(sha256_of(path), path.stat().st_size)
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != names.MANIFEST_FILE}


def file_problems(directory: Path, manifest: Manifest) -> list[str]:
    """Files that are missing, changed or unlisted, one line each; [] when the directory matches.

    The engines in `trt/` are built after export and checked against the graphs by their own metadata.
    """
    actual = {name: entry for name, entry in describe_files(directory).items()
              if not name.startswith(f"{names.ENGINE_DIR}/")}
    problems = [f"missing: {name}" for name in manifest.files if name not in actual]
    problems += [f"not in the manifest: {name}" for name in actual if name not in manifest.files]
    problems += [f"sha256 differs: {name}" for name, entry in manifest.files.items()
                 if name in actual and actual[name].sha256 != entry.sha256]
    return problems


def save_manifest(manifest: Manifest, directory: Path) -> Path:
    return write_record(manifest, Path(directory) / names.MANIFEST_FILE)


def load_manifest(directory: str | Path) -> Manifest:
    """Read and check `directory/manifest.json`; any unknown, missing or mistyped key is a CovipalError."""
    path = Path(directory) / names.MANIFEST_FILE
    if not path.is_file():
        raise CovipalError(f"no {names.MANIFEST_FILE} in {directory}: export one with `python export.py`")
    data = read_json(path)
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise CovipalError(f"{path}: format_version {version!r} is not supported (this package reads "
                           f"{FORMAT_VERSION}); export again with this version")
    manifest = from_json(Manifest, data, path)
    unknown = sorted(set(manifest.graphs) ^ set(names.STAGES))
    if unknown:
        raise CovipalError(f"{path}: graphs must be exactly {', '.join(names.STAGES)}; differs in {', '.join(unknown)}")
    for stage, graph in manifest.graphs.items():
        inputs, outputs = names.graph_io(stage, manifest.decoder.num_layers)
        if [t.name for t in graph.inputs] != inputs or [t.name for t in graph.outputs] != outputs:
            raise CovipalError(f"{path}: graphs.{stage} must have inputs {inputs} and outputs {outputs}")
    variant = manifest.kv_variant
    if variant is not None:
        inputs, outputs = names.kv_graph_io(manifest.decoder.num_layers)
        if [t.name for t in variant.graph.inputs] != inputs or [t.name for t in variant.graph.outputs] != outputs:
            raise CovipalError(f"{path}: kv_variant.graph must have inputs {inputs} and outputs {outputs}")
    return manifest
