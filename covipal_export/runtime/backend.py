"""The stage interface a backend implements, and the ONNX Runtime backend (CPU, or CUDA when usable).

A backend runs the four stages of an export directory; the pipeline owns tokenization, sampling and
the decode loop. The KV cache lives inside the backend between `prefill` and the following `step`s:

    encode_images(pixel_values [B, 3, S, S])                          -> visual [B, N, D]
    prune(input_ids [B, L], attention_mask [B, L], visual, budget)    -> PrunedPrompt (embed + prune + splice)
    prefill(prompt)                                                   -> logits [B, V]   (starts a new cache)
    step(token [B], attention_mask [B, P+1], position_ids [B, 1])     -> logits [B, V]   (extends the cache)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import onnxruntime as ort

from covipal_export import names
from covipal_export.manifest import Manifest
from covipal_export.ort_chain import OrtChain, PrunedPrompt

ORT_DEVICES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}


class Backend(ABC):
    """One way of running the stages; `name` is what results and the CLI report."""

    name: str

    @abstractmethod
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """visual_tokens [B, N, D]."""

    @abstractmethod
    def prune(self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: np.ndarray, budget: int,
              position_policy: str) -> PrunedPrompt:
        """Embed the prompt, keep `budget` visual tokens and splice them in."""

    @abstractmethod
    def prefill(self, prompt: PrunedPrompt) -> np.ndarray:
        """Logits of the last prompt position [B, V]; the cache now holds the prompt."""

    @abstractmethod
    def step(self, token: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits [B, V] after feeding one token per row; the cache grows by one."""


class OrtBackend(Backend):
    """ONNX Runtime sessions; the decoder runs through I/O binding so that the KV cache stays in OrtValues.

    Each step binds the previous step's `present.*` outputs as `past_key_values.*` inputs: the cache never
    round-trips through numpy (on CUDA it never leaves the device); only the logits [B, 1, V] come back.
    """

    def __init__(self, directory: str | Path, manifest: Manifest, provider: str = "CPUExecutionProvider",
                 threads: int | None = None):
        self.chain = OrtChain(directory, providers=[provider], threads=threads)
        self.name = f"onnxruntime-{ORT_DEVICES[provider]}"
        self.device = ORT_DEVICES[provider]
        self.decoder = self.chain.sessions[names.DECODER]
        graph = manifest.graphs[names.DECODER]
        self.dtypes = {spec.name: spec.dtype for spec in graph.inputs}
        self.past_names = names.past_names(manifest.decoder.num_layers)
        self.present_names = names.present_names(manifest.decoder.num_layers)
        self.past: list[ort.OrtValue] = []

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.chain.encode_images(pixel_values)

    def prune(self, input_ids: np.ndarray, attention_mask: np.ndarray, visual: np.ndarray, budget: int,
              position_policy: str) -> PrunedPrompt:
        return self.chain.prune_and_splice(input_ids, attention_mask, visual, budget, position_policy)

    def prefill(self, prompt: PrunedPrompt) -> np.ndarray:
        decoder = self.chain.manifest.decoder
        shape = (prompt.inputs_embeds.shape[0], decoder.num_kv_heads, 0, decoder.head_dim)  # [B, Hkv, 0, Dh]
        dtype = self.dtypes[self.past_names[0]]
        self.past = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, 0)
                     for _ in self.past_names]
        return self._decode(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids)

    def step(self, token: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self._decode(self.chain.embed(token[:, None]), attention_mask, position_ids)

    def _decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One decoder pass with past = the held cache; the present outputs become the held cache."""
        binding = self.decoder.io_binding()
        feeds = {names.INPUTS_EMBEDS: inputs_embeds, names.ATTENTION_MASK: attention_mask,
                 names.POSITION_IDS: position_ids}
        for name, array in feeds.items():
            array = np.ascontiguousarray(array, dtype=self.dtypes[name])
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(names.LOGITS, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)  # allocated by ONNX Runtime, kept where the decoder runs
        self.decoder.run_with_iobinding(binding)
        logits, *self.past = binding.get_outputs()
        return logits.numpy()[:, -1]  # [B, V]
