"""Model adapters and the registry of names users can pass as `--model`.

The registry (and with it transformers' model code) is imported on first use, so that a runtime that
only needs `processing` (prompts) or `base` does not load it.
"""

from covipal.models.base import ModelInfo, VisionLanguageModel
from covipal.models.processing import ImagePreprocessing, PromptBatch, PromptProcessor

_REGISTRY = ("MODEL_NAMES", "bundled_ppm", "load_model")

__all__ = ["MODEL_NAMES", "ImagePreprocessing", "ModelInfo", "PromptBatch", "PromptProcessor",
           "VisionLanguageModel", "bundled_ppm", "load_model"]


def __getattr__(name: str):
    if name in _REGISTRY:
        from covipal.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
