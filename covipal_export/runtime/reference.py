"""The PyTorch side of an export directory: its model and pruning strategy, rebuilt from the manifest alone.

The torch backend runs them; export builds what it exports with the same functions, and verification
and the evaluations compare against them. Random weights are rebuilt exactly because they are made
under the seed the manifest records.
"""

from __future__ import annotations

from pathlib import Path

import torch

from covipal.errors import CovipalError
from covipal.modeling_ppm import PPMConfig, PruningModule
from covipal.models import VisionLanguageModel, load_model
from covipal.strategies import Strategy, make_strategy
from covipal_export.manifest import Manifest, PPMSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def load_reference_model(name: str, *, dtype: str, path: str | Path | None = None, random_weights: bool = False,
                         num_layers: int | None = None, seed: int = 0) -> VisionLanguageModel:
    """A registered model in `dtype`, built under `seed` so random weights can be rebuilt exactly."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = load_model(name, path=path, random_weights=random_weights, num_layers=num_layers, dtype=DTYPES[dtype])
    if num_layers is not None and model.text_config.num_hidden_layers != num_layers:
        raise CovipalError(f"{name} has a fixed architecture ({model.text_config.num_hidden_layers} decoder layers); "
                           f"drop --layers")
    return model


def build_ppm(spec: PPMSpec, model: VisionLanguageModel) -> PruningModule:
    """The PPM of a manifest entry, in the model's dtype, checked against the model's visual tokens."""
    if spec.checkpoint is not None:
        ppm = PruningModule.load(spec.checkpoint)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            ppm = PruningModule(PPMConfig(**spec.config))
    expected = (model.num_visual_tokens, model.hidden_size)
    if (ppm.config.num_visual_tokens, ppm.config.hidden_size) != expected:
        raise CovipalError(f"the PPM scores [B, {ppm.config.num_visual_tokens}, {ppm.config.hidden_size}] visual "
                           f"tokens but {model.info.name} makes [B, {expected[0]}, {expected[1]}]")
    return ppm.to(model.embed_tokens.weight.dtype).eval()


def reference_from_manifest(manifest: Manifest) -> tuple[VisionLanguageModel, Strategy]:
    """Rebuild the PyTorch model and strategy an export directory was made from."""
    spec = manifest.model
    layers = manifest.decoder.num_layers if spec.random_weights else None
    model = load_reference_model(spec.name, dtype=spec.dtype, path=spec.path, random_weights=spec.random_weights,
                                 num_layers=layers, seed=spec.seed)
    if spec.random_weights and model.info.random_init != spec.random_init:
        raise CovipalError(f"{spec.name}: this export's random weights were made {_init_words(spec.random_init)}, "
                           f"this version makes them {_init_words(model.info.random_init)}; they cannot be rebuilt: "
                           f"export again")
    pruning = manifest.pruning
    if pruning.ppm is None:
        return model, make_strategy(pruning.strategy)
    return model, make_strategy("ppm", ppm=build_ppm(pruning.ppm, model))


def _init_words(scheme: str | None) -> str:
    return "with the whole model built at once" if scheme is None else f"{scheme!r}"
