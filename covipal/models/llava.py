"""Hugging Face `LlavaForConditionalGeneration` as a covipal `VisionLanguageModel`.

The split reuses the Hugging Face modules as they are (no copies of weights):
    vision         = vision_tower -> hidden_states[vision_feature_layer] (CLS dropped) -> multi_modal_projector
    language_model = model.model.language_model (LlamaModel, holds embed_tokens)
    lm_head        = model.lm_head
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from covipal.errors import CovipalError
from covipal.models.base import ModelInfo, VisionLanguageModel
from covipal.models.processing import ImagePreprocessing, PromptProcessor

_PIL_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}


class LlavaVision(nn.Module):
    """CLIP-style vision tower + projector: pixel_values [B, 3, S, S] -> visual tokens [B, N, D]."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, feature_layer: int, select_strategy: str):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = projector
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.vision_tower(pixel_values, output_hidden_states=True)
        features = outputs.hidden_states[self.feature_layer]  # [B, 1+N, Dv], CLS first
        if self.select_strategy == "default":
            features = features[:, 1:]  # [B, N, Dv]
        return self.multi_modal_projector(features)  # [B, N, D]


def num_visual_tokens(config: LlavaConfig) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches if config.vision_feature_select_strategy == "default" else patches + 1


def adapter_from_hf(hf_model: LlavaForConditionalGeneration, info: ModelInfo,
                    processor: PromptProcessor | None) -> VisionLanguageModel:
    """Wrap a Hugging Face LLaVA model; the Hugging Face model stays reachable as `.hf_model`."""
    config = hf_model.config
    if not isinstance(config.vision_feature_layer, int):
        raise CovipalError(f"{info.name}: a list of vision feature layers is not supported "
                           f"(got {config.vision_feature_layer})")
    inner = hf_model.model
    vision = LlavaVision(inner.vision_tower, inner.multi_modal_projector,
                         config.vision_feature_layer, config.vision_feature_select_strategy)
    adapter = VisionLanguageModel(
        info=info,
        vision=vision,
        language_model=inner.language_model,
        lm_head=hf_model.lm_head,
        processor=processor,
        num_visual_tokens=num_visual_tokens(config),
        image_size=config.vision_config.image_size,
        image_token_id=config.image_token_id,
    )
    adapter.hf_model = hf_model
    return adapter


def processor_from_hf(hf_processor, num_image_tokens: int) -> PromptProcessor:
    """Our `PromptProcessor` from a Hugging Face `LlavaProcessor` (CLIP-style preprocessing)."""
    image_processor = hf_processor.image_processor
    if getattr(image_processor, "do_pad", False):
        raise CovipalError("this checkpoint pads images to a square before resizing, which is not supported yet")
    size = image_processor.size.get("shortest_edge") or image_processor.size["height"]
    crop = image_processor.crop_size["height"] if image_processor.do_center_crop else size
    resample = _PIL_RESAMPLE_NAMES.get(int(image_processor.resample), "bicubic")
    return PromptProcessor(
        tokenizer=hf_processor.tokenizer,
        chat_template=hf_processor.chat_template,
        image_token=hf_processor.image_token,
        num_image_tokens=num_image_tokens,
        image_preprocessing=ImagePreprocessing(
            size=size, crop_size=crop, mean=tuple(image_processor.image_mean), std=tuple(image_processor.image_std),
            resize_mode="shortest_edge", resample=resample,
        ),
    )
