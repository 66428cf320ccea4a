"""The PyTorch reference behind the backend interface.

Unlike the ONNX backends it rebuilds the model from the covipal registry (weights included) with the
strategy the directory was exported with (`reference_from_manifest`), so it needs what export needed.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from covipal.pruning import prune_prompt
from covipal_export.manifest import Manifest
from covipal_export.ort_chain import PrunedPrompt
from covipal_export.reference import reference_from_manifest
from covipal_export.runtime.backend import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, manifest: Manifest):
        self.model, self.strategy = reference_from_manifest(manifest)
        self.cache: DynamicCache | None = None

    @torch.inference_mode()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(pixel_values).to(self.model.embed_tokens.weight.dtype)
        return self.model.encode_images(pixels).numpy()  # [B, N, D]

    @torch.inference_mode()
    def prune(self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: np.ndarray, budget: int,
              position_policy: str) -> PrunedPrompt:
        model, ids = self.model, torch.from_numpy(input_ids)
        embeds = model.embed_prompt(ids)  # [B, L, D]
        prompt = prune_prompt(embeds, ids, torch.from_numpy(attention_mask), torch.from_numpy(visual),
                              model.image_token_id, self.strategy, budget, position_policy)
        scores = prompt.scores.float().numpy() if prompt.scores is not None else None
        return PrunedPrompt(prompt.inputs_embeds.numpy(), prompt.attention_mask.numpy(), prompt.position_ids.numpy(),
                            prompt.kept_index.numpy(), scores)

    @torch.inference_mode()
    def prefill(self, prompt: PrunedPrompt) -> np.ndarray:
        self.cache = self.model.new_cache()
        logits = self.model.decode(torch.from_numpy(prompt.inputs_embeds), torch.from_numpy(prompt.attention_mask),
                                   torch.from_numpy(prompt.position_ids), self.cache)
        return logits[:, -1].float().numpy()  # [B, V]

    @torch.inference_mode()
    def step(self, token: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        embeds = self.model.embed_tokens(torch.from_numpy(token)[:, None])  # [B, 1, D]
        logits = self.model.decode(embeds, torch.from_numpy(attention_mask), torch.from_numpy(position_ids), self.cache)
        return logits[:, -1].float().numpy()  # [B, V]
