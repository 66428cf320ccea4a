"""Canonical names: stages, graph files, tensor names and symbolic dimensions, spelled once.

Export writes these names into the graphs and the manifest; the runtime reads them back from the
manifest. KV-cache names follow ONNX Runtime GenAI (`past_key_values.%d.key` -> `present.%d.key`).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = Path("engines")  # where `python export.py` writes and `run_trt.py` looks: engines/<model>-b<budget>
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"  # tokenizer files, copied into the export directory
ENGINE_DIR = "trt"  # TensorRT engines, built from the graphs after export (each described by its .engine.json)
# A graph whose weights pass this keeps them in `<graph file>.data`, written tensor by tensor (one file is serialized
# whole in memory: twice its weights). ONNX's own limit is 2 GB.
EXTERNAL_DATA_BYTES = 2**27

# Stages, in pipeline order, and their graph files.
VISION, EMBED, PRUNE, DECODER = "vision", "embed", "prune", "decoder"
STAGES = (VISION, EMBED, PRUNE, DECODER)
GRAPH_FILES = {VISION: "vision.onnx", EMBED: "embed.onnx", PRUNE: "ppm.onnx", DECODER: "decoder.onnx"}
# The decoder on a compressed KV cache (`export.py --kv-variant`), beside decoder.onnx: the manifest's kv_variant.
KV_DECODER, KV_DECODER_FILE = "decoder_kv", "decoder_kv.onnx"

# Tensors.
PIXEL_VALUES = "pixel_values"  # [batch, 3, S, S] float32
VISUAL_TOKENS = "visual_tokens"  # [batch, N, D]
INPUT_IDS = "input_ids"  # [batch, sequence] int64
TEXT_EMBEDS = "text_embeds"  # [batch, sequence | text, D]
TEXT_MASK = "text_mask"  # [batch, text] int64, 1 = a real text token
BUDGET = "budget"  # [] int64, visual tokens to keep
KEPT_TOKENS = "kept_tokens"  # [batch, kept, D]
KEPT_INDEX = "kept_index"  # [batch, kept] int64, ascending
SCORES = "scores"  # [batch, N] float32
INPUTS_EMBEDS = "inputs_embeds"  # [batch, sequence, D]
ATTENTION_MASK = "attention_mask"  # [batch, total] int64, total = past + sequence
POSITION_IDS = "position_ids"  # [batch, sequence] int64
LOGITS = "logits"  # [batch, 1 | sequence, V]
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"  # [batch, Hkv, past, Dh]
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"  # [batch, Hkv, total, Dh]
# decoder_kv.onnx: past_key_values.%d.* have a length per layer (past_%d), and these
INPUT_MASK = "input_mask"  # [batch, sequence] bool, the new tokens' own validity (False at left padding)
PAST_MASK = "past_mask.%d"  # [batch, Hq, past_%d] bool, which past slot each query head may attend to
NEW_KEY, NEW_KEY_PRE, NEW_VALUE = "new.%d.key", "new.%d.key_pre", "new.%d.value"  # [batch, Hkv, sequence, Dh]
WINDOW_QUERY = "window_query.%d"  # [batch, Hq, window, Dh] the last `window` queries (post-RoPE), SnapKV's rows
HIDDEN_STATES = "hidden_states.%d"  # [batch, sequence, D] inside decoder.onnx: the input of layer i (i >= 1)

# Symbolic dimensions.
BATCH, TEXT, SEQUENCE, PAST, TOTAL, KEPT = "batch", "text", "sequence", "past", "total", "kept"
WINDOW = "window"  # decoder_kv.onnx: min(window, sequence) query rows


def past_names(num_layers: int) -> list[str]:
    """`past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ...`"""
    return [name % i for i in range(num_layers) for name in (PAST_KEY, PAST_VALUE)]


def present_names(num_layers: int) -> list[str]:
    return [name % i for i in range(num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]


def kv_graph_io(num_layers: int) -> tuple[list[str], list[str]]:
    """decoder_kv.onnx's input and output names, in graph order (per layer: key, value, mask; key, key_pre, value,
    window queries)."""
    past = [name % i for i in range(num_layers) for name in (PAST_KEY, PAST_VALUE, PAST_MASK)]
    new = [name % i for i in range(num_layers) for name in (NEW_KEY, NEW_KEY_PRE, NEW_VALUE, WINDOW_QUERY)]
    return [INPUTS_EMBEDS, INPUT_MASK, POSITION_IDS, *past], [LOGITS, *new]


def graph_file(stage: str) -> str:
    """The file of a stage's graph, or of the decoder_kv variant."""
    return GRAPH_FILES[stage] if stage in GRAPH_FILES else {KV_DECODER: KV_DECODER_FILE}[stage]


def past_dim(layer: int) -> str:
    """decoder_kv.onnx's symbolic past length of one layer."""
    return f"{PAST}_{layer}"


def graph_io(stage: str, num_layers: int) -> tuple[list[str], list[str]]:
    """A stage's input and output names, in graph order."""
    return {
        VISION: ([PIXEL_VALUES], [VISUAL_TOKENS]),
        EMBED: ([INPUT_IDS], [TEXT_EMBEDS]),
        PRUNE: ([VISUAL_TOKENS, TEXT_EMBEDS, TEXT_MASK, BUDGET], [KEPT_TOKENS, KEPT_INDEX, SCORES]),
        DECODER: ([INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers)],
                  [LOGITS, *present_names(num_layers)]),
    }[stage]
