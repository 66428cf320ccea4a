"""`--quant-method awq`: NVIDIA ModelOpt's AWQ scales, searched on the PyTorch decoder and folded into its weights
before decoder.onnx is exported; ONNX Runtime's round-to-nearest then rounds the scaled weights (quantize.py).

    calibration_prompts   each (image, question) pair through the PyTorch model's vision tower, embedding and pruning
                          at the export's budget -> the pruned prompt the decoder sees (batch 1, no padding)
    apply_awq_scales      ModelOpt's awq_lite on a copy of the language model: for each linear layer, one scale per
                          input channel (s = mean|x|^alpha, alpha searched on the prompts), the one whose rounded
                          W * s, fed x / s, gives the layer's output closest to the unrounded layer's. The scales are
                          folded so that no extra op runs: layers that read one input share the mean of their
                          scales (q/k/v, gate/up), folded into the RMSNorm before them; o_proj's go into v_proj
                          (averaged over the query heads of each key/value head), down_proj's into up_proj. The copy
                          computes what the model computed; its weights are copied back into the model, which is
                          then exported as usual.

ModelOpt's own ONNX AWQ (which ONNX Runtime's `nvidia_awq` runs) needs CUDA (cupy); its PyTorch AWQ runs on the CPU.
The copy costs a second language model in memory while the scales are searched.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import warnings

import torch
from torch import nn

from covipal.budget import Budget
from covipal.errors import CovipalError
from covipal.generation import pruned_prompt
from covipal.models import VisionLanguageModel
from covipal.pruning import PrunedPrompt
from covipal.strategies import Strategy
from covipal_export.export.calibration import CalibrationSet
from covipal_export.memory import available_bytes, gib

PACKAGE = "nvidia-modelopt"
ALGORITHM = "awq_lite"
LLAMA_LAYER = "LlamaDecoderLayer"  # the layer whose norms and linears the scales are folded into


def library() -> str:
    """What the manifest names as the AWQ library; a one-line error without it."""
    try:
        return f"{PACKAGE} {importlib.metadata.version(PACKAGE)} ({ALGORITHM})"
    except importlib.metadata.PackageNotFoundError:
        raise CovipalError(f"--quant-method awq needs {PACKAGE} (pip install {PACKAGE}; `make setup` installs it)") \
            from None


def check_awq_model(model: VisionLanguageModel) -> None:
    """AWQ's scales are folded into Llama decoder layers (LLaVA-1.5's Vicuna, mini-llava's SmolLM2)."""
    kinds = {type(layer).__name__ for layer in model.language_model.layers}
    if kinds != {LLAMA_LAYER}:
        raise CovipalError(f"--quant-method awq folds its scales into {LLAMA_LAYER}s; {model.info.name}'s decoder "
                           f"has {', '.join(sorted(kinds))}")
    model.require_processor()  # the prompts are the model's own chat prompts


@torch.no_grad()
def calibration_prompts(model: VisionLanguageModel, strategy: Strategy, budget: Budget, position_policy: str,
                        calibration: CalibrationSet) -> list[PrunedPrompt]:
    """The decoder's prefill inputs for each pair, made by the PyTorch model (the graphs are not exported yet)."""
    processor = model.require_processor()
    return [pruned_prompt(model, processor([image], [question]), strategy, budget, position_policy)
            for image, question in zip(calibration.images, calibration.questions)]


def apply_awq_scales(language_model: nn.Module, prompts: list[PrunedPrompt], block: int) -> None:
    """Search AWQ scales for int4 weights in blocks of `block` on `prompts` and fold them into `language_model`'s
    weights in place (the function it computes is unchanged)."""
    with warnings.catch_warnings():  # ModelOpt warns about any transformers release it was not tested with
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export.quant_utils import (
            fuse_prequant_layernorm,
            fuse_prequant_to_linear,
            preprocess_linear_fusion,
        )

    config = copy.deepcopy(mtq.INT4_AWQ_CFG)  # weight quantizers only, awq_lite
    weight_entry = next(entry for entry in config["quant_cfg"] if entry.get("quantizer_name") == "*weight_quantizer")
    weight_entry["cfg"]["block_sizes"] = {-1: block, "type": "static"}

    def forward_loop(model: nn.Module) -> None:
        for prompt in prompts:
            model(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                  position_ids=prompt.position_ids, use_cache=False)

    need, available = sum(p.numel() * p.element_size() for p in language_model.parameters()), available_bytes()
    if need > available:
        raise CovipalError(f"--quant-method awq searches its scales on a copy of the language model ({gib(need)}); "
                           f"only {gib(available)} of memory is available")
    scaled = copy.deepcopy(language_model)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # ModelOpt prints its progress
        warnings.simplefilter("ignore")
        mtq.quantize(scaled, config, forward_loop=forward_loop)
        fuse_prequant_to_linear(scaled, fuse_grouped_heads=True)  # o_proj -> v_proj, down_proj -> up_proj
        for layer in scaled.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj]),
                                  (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])):
                preprocess_linear_fusion(readers, resmooth_only=True)  # one scale: the mean of theirs
                fuse_prequant_layernorm(norm, readers)
    left = [name for name, module in scaled.named_modules()
            if getattr(getattr(module, "input_quantizer", None), "_pre_quant_scale", None) is not None]
    if left:
        raise CovipalError(f"AWQ left scales that fold into no weight: {', '.join(left)}")
    parameters = dict(language_model.named_parameters())
    for name, value in scaled.named_parameters():
        if name in parameters:
            parameters[name].data.copy_(value.data)
