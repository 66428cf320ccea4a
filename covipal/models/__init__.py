"""Model adapters and the registry of names users can pass as `--model`."""

from covipal.models.base import ModelInfo, VisionLanguageModel
from covipal.models.processing import ImagePreprocessing, PromptBatch, PromptProcessor
from covipal.models.registry import MODEL_NAMES, bundled_ppm, load_model

__all__ = ["MODEL_NAMES", "ImagePreprocessing", "ModelInfo", "PromptBatch", "PromptProcessor",
           "VisionLanguageModel", "bundled_ppm", "load_model"]
