"""CoViPAL visual-token pruning for LLaVA-class models, in pure PyTorch.

The method (PPM, selection, strategies), model adapters and pruned generation. No ONNX or
TensorRT here: deployment lives in `covipal_export`, which builds on this package.
"""

from covipal.errors import CovipalError
from covipal.generation import GenerationOutput, SamplingConfig, generate, generate_from_batch
from covipal.modeling_ppm import PPMConfig, PruningModule
from covipal.selection import gather_tokens, keep_topk_in_order
from covipal.strategies import STRATEGY_NAMES, Strategy, make_strategy

__version__ = "0.1.0"

__all__ = ["STRATEGY_NAMES", "CovipalError", "GenerationOutput", "PPMConfig", "PruningModule", "SamplingConfig",
           "Strategy", "gather_tokens", "generate", "generate_from_batch", "keep_topk_in_order", "make_strategy"]
