"""What a calibrated quantizer (`--quant-method awq`, `gptq`) sees: (image, question) pairs, as decoder inputs.

    calibration_pairs   mini-llava: a seeded sample of easy-VQA train; any other model: the bundled images, each
                        with a few generic questions
    decoder_feeds       gptq: each pair through the export's own vision, embed and pruning graphs at its default
                        budget -> the prefill's decoder inputs (inputs_embeds, attention_mask, position_ids, empty
                        past); awq makes the same inputs with the PyTorch model (`awq.calibration_prompts`)

One pair a feed (batch 1), so no padding rows reach the quantizer's statistics.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import covipal
from covipal.errors import CovipalError
from covipal.training.data import easy_vqa
from covipal_export import names

ASSETS = Path(covipal.__file__).parent / "assets"
EASY_VQA_MODELS = ("mini-llava",)  # trained on easy-VQA, so calibrated on its train split
GENERIC_QUESTIONS = ("What is in the image?", "Describe the image in one sentence.", "What colour is the main object?",
                     "How many objects are there?")
SEED = 0


@dataclass
class CalibrationSet:
    """The (image, question) pairs, and what the manifest records of them."""

    images: list[Path]
    questions: list[str]
    data: str  # in words, for the manifest

    def record(self) -> dict[str, str | int]:
        return {"data": self.data, "count": len(self.questions)}


def calibration_pairs(model_name: str, count: int) -> CalibrationSet:
    """`count` pairs for `model_name`; a one-line CovipalError when there are not that many."""
    if model_name in EASY_VQA_MODELS:
        examples = easy_vqa.sample(easy_vqa.load_split("train"), count, SEED)  # CovipalError without the package
        return CalibrationSet([e.image for e in examples], [e.question for e in examples],
                              f"easy-VQA train, {count} seeded questions (seed {SEED})")
    images = sorted(p for p in ASSETS.iterdir() if p.suffix in (".png", ".jpg"))
    pairs = [(image, question) for question in GENERIC_QUESTIONS for image in images]
    if count > len(pairs):
        raise CovipalError(f"--calib {count}: {model_name} calibrates on the {len(images)} bundled images with "
                           f"{len(GENERIC_QUESTIONS)} generic questions each, {len(pairs)} pairs in all")
    chosen = pairs[:count]
    return CalibrationSet([image for image, _ in chosen], [question for _, question in chosen],
                          f"the bundled images (covipal/assets) with generic questions, {count} pairs")


def decoder_feeds(directory: Path, calibration: CalibrationSet) -> list[dict[str, np.ndarray]]:
    """The decoder's prefill inputs for each pair, from the export in `directory` (its graphs before quantization)."""
    from covipal_export.runtime.pipeline import Pipeline

    pipe = Pipeline.from_dir(directory, backend="ort", check_files=False)
    backend, manifest = pipe.backend, pipe.manifest
    k = pipe.resolve_budget(None)
    past = {name: np.zeros((1, manifest.decoder.num_kv_heads, 0, manifest.decoder.head_dim), np.float32)
            for name in names.past_names(manifest.decoder.num_layers)}  # [1, Hkv, 0, Dh]
    dtypes = {spec.name: spec.dtype for spec in manifest.graphs[names.DECODER].inputs}
    feeds = []
    for image, question in tqdm(list(zip(calibration.images, calibration.questions)), desc="calibration inputs",
                                unit="pair", leave=False, disable=None, file=sys.stderr):
        batch = pipe.processor([image], [question])
        visual = backend.encode_images(batch.pixel_values)  # [1, N, D]
        prompt = backend.prune(batch.input_ids, batch.attention_mask, visual, k, manifest.pruning.position_policy)
        feed = {names.INPUTS_EMBEDS: prompt.inputs_embeds.numpy(), names.ATTENTION_MASK: prompt.attention_mask.numpy(),
                names.POSITION_IDS: prompt.position_ids.numpy(), **past}  # [1, S, D], [1, S], [1, S]
        feeds.append({name: np.ascontiguousarray(value, dtype=dtypes[name]) for name, value in feed.items()})
    return feeds
