"""An export directory run in ONNX Runtime: the four graphs, the host-side splice and greedy decoding.

    input_ids [B, L] (N image tokens per row), attention_mask [B, L] (left padding), pixel_values [B, 3, S, S]
      vision.onnx   -> visual_tokens [B, N, D]
      embed.onnx    -> embeds [B, L, D]                  image slots embedded as token 0, replaced below
      host          -> text_embeds [B, T, D], text_mask [B, T]   the valid non-image tokens, left-aligned
      ppm.onnx      -> kept_tokens [B, k, D], kept_index [B, k]  (budget is an input of the graph)
      host splice   -> inputs_embeds [B, L-N+k, D], attention_mask, position_ids   (keep | compact)
      decoder.onnx  -> prefill with past length 0, then one step per new token; present -> past

The host steps are numpy ports of `covipal.pruning` (verify.py checks them token for token against
`covipal.generation.generate_from_batch`). Tensor names and dtypes come from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from covipal.errors import CovipalError
from covipal.pruning import POSITION_POLICIES
from covipal_export import names
from covipal_export.manifest import Manifest, load_manifest


@dataclass
class PrunedPrompt:
    """The prefill inputs after pruning (numpy), plus what was kept."""

    inputs_embeds: np.ndarray  # [B, S, D], S = L - N + k
    attention_mask: np.ndarray  # [B, S] int64
    position_ids: np.ndarray  # [B, S] int64
    kept_index: np.ndarray  # [B, k] ascending
    scores: np.ndarray  # [B, N]


@dataclass
class ChainOutput:
    sequences: np.ndarray  # [B, n] new tokens; rows that stopped early are padded
    kept_index: np.ndarray  # [B, k]
    scores: np.ndarray  # [B, N]
    prefill_length: int  # L - N + k


class OrtChain:
    """ONNX Runtime sessions for the four graphs of an export directory."""

    def __init__(self, directory: str | Path, providers: list[str] | None = None, threads: int | None = None):
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        self.sessions = {stage: new_session(self.manifest.graph_path(self.directory, stage), providers, threads)
                         for stage in names.STAGES}

    def run(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph; feeds are cast to the dtypes the manifest gives its inputs."""
        graph = self.manifest.graphs[stage]
        expected = [spec.name for spec in graph.inputs]
        if sorted(feeds) != sorted(expected):
            raise CovipalError(f"{graph.file} takes {', '.join(expected)}; got {', '.join(feeds)}")
        cast = {spec.name: np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype) for spec in graph.inputs}
        outputs = self.sessions[stage].run(None, cast)
        return dict(zip((spec.name for spec in graph.outputs), outputs))

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.run(names.VISION, {names.PIXEL_VALUES: pixel_values})[names.VISUAL_TOKENS]  # [B, N, D]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.run(names.EMBED, {names.INPUT_IDS: input_ids})[names.TEXT_EMBEDS]  # [B, L, D]

    def prune(self, visual_tokens: np.ndarray, text_embeds: np.ndarray, text_mask: np.ndarray,
              budget: int) -> dict[str, np.ndarray]:
        """kept_tokens [B, k, D], kept_index [B, k] and scores [B, N] for k = min(budget, N)."""
        feeds = {names.VISUAL_TOKENS: visual_tokens, names.TEXT_EMBEDS: text_embeds, names.TEXT_MASK: text_mask,
                 names.BUDGET: np.array(check_budget(budget))}
        return self.run(names.PRUNE, feeds)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Past keys and values of length 0, in input order (layer 0 key, layer 0 value, ...)."""
        decoder = self.manifest.decoder
        shape = (batch, decoder.num_kv_heads, 0, decoder.head_dim)
        dtype = self.manifest.graphs[names.DECODER].input(names.PAST_KEY % 0).dtype
        return [np.zeros(shape, dtype=dtype) for _ in range(2 * decoder.num_layers)]

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder pass: logits [B, 1 | S, V] and the present cache (the next step's past)."""
        num_layers = self.manifest.decoder.num_layers
        feeds = {names.INPUTS_EMBEDS: inputs_embeds, names.ATTENTION_MASK: attention_mask,
                 names.POSITION_IDS: position_ids, **dict(zip(names.past_names(num_layers), past))}
        outputs = self.run(names.DECODER, feeds)
        return outputs[names.LOGITS], [outputs[name] for name in names.present_names(num_layers)]

    def prepare_prompt(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray,
                       budget: int | None = None, position_policy: str | None = None) -> PrunedPrompt:
        """Vision, embed and prune, then splice the kept visual tokens into the prompt (budget None: all N)."""
        return self.prune_and_splice(input_ids, attention_mask, self.encode_images(pixel_values), budget,
                                     position_policy)

    def prune_and_splice(self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: np.ndarray,
                         budget: int | None = None, position_policy: str | None = None) -> PrunedPrompt:
        """Embed and prune, then splice the kept visual tokens [B, k, D] of `visual` [B, N, D] into the prompt."""
        manifest = self.manifest
        image_token_id, num_visual = manifest.model.image_token_id, manifest.model.num_visual_tokens
        policy = position_policy or manifest.pruning.position_policy
        if policy not in POSITION_POLICIES:
            raise CovipalError(f"unknown position policy {policy!r}; choose one of: {', '.join(POSITION_POLICIES)}")
        start = image_starts(input_ids, image_token_id, num_visual)  # [B]
        embeds = self.embed(np.where(input_ids == image_token_id, 0, input_ids))  # [B, L, D]
        text_embeds, text_mask = text_for_scoring(embeds, input_ids, attention_mask, image_token_id)
        pruned = self.prune(visual, text_embeds, text_mask, num_visual if budget is None else budget)
        kept_index = pruned[names.KEPT_INDEX]  # [B, k]
        inputs_embeds, mask, positions = splice(embeds, input_ids, attention_mask, start, pruned[names.KEPT_TOKENS],
                                                kept_index, image_token_id, policy)
        return PrunedPrompt(inputs_embeds, mask, positions, kept_index, pruned[names.SCORES])

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray, *,
                 budget: int | None = None, position_policy: str | None = None,
                 max_new_tokens: int = 32) -> ChainOutput:
        """Greedy decoding with the KV cache; rows stop at EOS and are padded after it."""
        prompt = self.prepare_prompt(input_ids, attention_mask, pixel_values, budget, position_policy)
        batch = input_ids.shape[0]
        special = self.manifest.special_tokens
        logits, past = self.decode(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids,
                                   self.empty_cache(batch))
        mask = prompt.attention_mask
        position = prompt.position_ids[:, -1:] + 1  # [B, 1], the last prompt token is never padding
        finished = np.zeros(batch, dtype=bool)
        tokens = []
        for step in range(max_new_tokens):
            token = np.where(finished, special.pad, logits[:, -1].argmax(-1))  # [B]
            tokens.append(token)
            finished |= np.isin(token, special.eos)
            if finished.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)  # [B, P+1]
            logits, past = self.decode(self.embed(token[:, None]), mask, position, past)
            position = position + 1
        return ChainOutput(np.stack(tokens, axis=1), prompt.kept_index, prompt.scores, prompt.inputs_embeds.shape[1])


# CUDA's fp32 matmuls would otherwise run in TF32 (10-bit mantissa) on Ampere and later, and greedy tokens then
# drift from the PyTorch model; fp16 graphs are unaffected.
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def new_session(path: Path, providers: list[str] | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session that logs errors only (CPU unless `providers` says otherwise).

    threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
    providers = providers or ["CPUExecutionProvider"]
    provider_options = [PROVIDER_OPTIONS.get(name, {}) for name in providers]
    return ort.InferenceSession(str(path), options, providers=providers, provider_options=provider_options)


def check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise CovipalError(f"budget must be a positive integer, got {budget!r}")
    return int(budget)


def image_starts(input_ids: np.ndarray, image_token_id: int, num_visual: int) -> np.ndarray:
    """Start of each row's contiguous run of `num_visual` image tokens, [B]."""
    image = input_ids == image_token_id  # [B, L]
    counts = image.sum(-1)
    if (counts != num_visual).any():
        raise CovipalError(f"each prompt needs exactly {num_visual} image tokens, got {counts.tolist()}")
    start = image.argmax(-1)  # [B]
    if not np.take_along_axis(image, start[:, None] + np.arange(num_visual), 1).all():
        raise CovipalError("the image tokens of a prompt must be contiguous")
    return start


def text_for_scoring(embeds: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
                     image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The valid non-image tokens, left-aligned in order: text_embeds [B, T, D], text_mask [B, T] int64."""
    is_text = (attention_mask != 0) & (input_ids != image_token_id)  # [B, L]
    length = int(is_text.sum(-1).max())
    order = np.argsort(~is_text, axis=-1, kind="stable")[:, :length]  # [B, T], text first
    return np.take_along_axis(embeds, order[..., None], 1), np.take_along_axis(is_text, order, 1).astype(np.int64)


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Contiguous positions over the valid tokens of left-padded rows (padding gets 0)."""
    return np.where(attention_mask == 0, 0, attention_mask.cumsum(-1) - 1)


def splice(embeds: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, start: np.ndarray,
           kept_tokens: np.ndarray, kept_index: np.ndarray, image_token_id: int,
           position_policy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefix + kept visual tokens + suffix: inputs_embeds [B, S, D], attention_mask [B, S], position_ids [B, S]."""
    batch = input_ids.shape[0]
    slots = start[:, None] + kept_index  # [B, k] prompt positions of the kept image tokens
    embeds = embeds.copy()
    np.put_along_axis(embeds, slots[..., None], kept_tokens.astype(embeds.dtype), 1)
    keep = input_ids != image_token_id  # [B, L]
    np.put_along_axis(keep, slots, True, 1)
    seq_index = np.nonzero(keep)[1].reshape(batch, -1)  # [B, S] ascending: prefix, kept tokens, suffix
    mask = np.take_along_axis(attention_mask, seq_index, 1)  # [B, S]
    if position_policy == "keep":
        positions = np.take_along_axis(positions_from_mask(attention_mask), seq_index, 1)
    else:
        positions = positions_from_mask(mask)
    return np.take_along_axis(embeds, seq_index[..., None], 1), mask, positions
