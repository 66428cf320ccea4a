"""ONNX Runtime behind the backend interface: the four graphs of an export directory, CPU or CUDA.

    run       one graph; feeds are cast to the dtypes the manifest gives its inputs
    decoder   through I/O binding, so the KV cache stays in OrtValues: each step binds the previous
              step's `present.*` outputs as its `past_key_values.*` inputs; the cache never round-trips
              through numpy (on CUDA it never leaves the device) and only logits [B, 1, V] come back
    kv        decoder_kv.onnx (`--kv-variant`), opened on first use, under `compressed_kv.HostCompressedKV`: the
              compressed cache is torch tensors on the host, fed as numpy arrays at each step
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from covipal.errors import CovipalError
from covipal.kv_compression import KVConfig
from covipal.pruning import PrunedPrompt
from covipal_export import names
from covipal_export.manifest import Manifest
from covipal_export.runtime.backend import GraphBackend, KVCache
from covipal_export.runtime.compressed_kv import HostCompressedKV, kv_variant

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
ORT_DEVICES = {CPU: "cpu", CUDA: "cuda"}
# CUDA's fp32 matmuls would otherwise run in TF32 (10-bit mantissa) on Ampere and later, and greedy tokens then
# drift from the PyTorch model; fp16 graphs are unaffected.
PROVIDER_OPTIONS = {CUDA: {"use_tf32": "0"}}


def new_session(model: Path | bytes, providers: list[str] | None = None, threads: int | None = None,
                external_data_dir: Path | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session that logs errors only (CPU unless `providers` says otherwise).

    model: a graph file, or a serialized graph whose external weights are in `external_data_dir`.
    threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
    if external_data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    providers = providers or [CPU]
    provider_options = [PROVIDER_OPTIONS.get(name, {}) for name in providers]
    model = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(model, options, providers=providers, provider_options=provider_options)


class OrtBackend(GraphBackend):
    """ONNX Runtime sessions for the four graphs; sessions are shared by concurrent calls."""

    def __init__(self, directory: str | Path, manifest: Manifest, provider: str = CPU, threads: int | None = None):
        super().__init__(manifest)
        self.directory = Path(directory)
        self.sessions = {stage: new_session(manifest.graph_path(self.directory, stage), [provider], threads)
                         for stage in names.STAGES}
        self.provider, self.threads = provider, threads
        self._kv_session: ort.InferenceSession | None = None  # decoder_kv.onnx, opened on first use
        self._kv_lock = threading.Lock()
        self.name = f"onnxruntime-{ORT_DEVICES[provider]}"
        self.device = ORT_DEVICES[provider]
        self.dtypes = {stage: {spec.name: spec.dtype for spec in graph.inputs}  # stage -> input -> numpy dtype
                       for stage, graph in manifest.graphs.items()}
        self.past_names = names.past_names(manifest.decoder.num_layers)
        self.present_names = names.present_names(manifest.decoder.num_layers)

    def run(self, stage: str, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        graph = self.manifest.graphs[stage]
        expected = [spec.name for spec in graph.inputs]
        if sorted(feeds) != sorted(expected):
            raise CovipalError(f"{graph.file} takes {', '.join(expected)}; got {', '.join(feeds)}")
        outputs = self.sessions[stage].run(None, {name: self._array(stage, name, feeds[name]) for name in expected})
        return {spec.name: torch.from_numpy(value) for spec, value in zip(graph.outputs, outputs)}

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Past keys and values of length 0, in input order (layer 0 key, layer 0 value, ...)."""
        decoder = self.manifest.decoder
        shape = (batch, decoder.num_kv_heads, 0, decoder.head_dim)  # [B, Hkv, 0, Dh]
        return [np.zeros(shape, dtype=self.dtypes[names.DECODER][name]) for name in self.past_names]

    def prefill(self, prompt: PrunedPrompt) -> tuple[torch.Tensor, KVCache]:
        past = [ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
                for value in self.empty_cache(prompt.inputs_embeds.shape[0])]
        cache = KVCache(past)
        return self._decode(cache, prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids), cache

    def extend(self, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.run(names.EMBED, {names.INPUT_IDS: input_ids})[names.TEXT_EMBEDS]  # [B, S, D]
        return self._decode(cache, embeds, attention_mask, position_ids)

    def check_kv(self, kv: KVConfig) -> None:
        if kv.method != "none":
            kv_variant(self.manifest, kv)  # the export has decoder_kv.onnx, for this method

    def prefill_compressed(self, prompt: PrunedPrompt, kv: KVConfig) -> tuple[torch.Tensor, KVCache]:
        cache = HostCompressedKV(self.manifest, kv, self._run_kv, self._embed)
        return cache.prefill(prompt), KVCache(cache)

    def full_kv_bytes(self, cache: KVCache) -> int:
        itemsize = np.dtype(self.dtypes[names.DECODER][self.past_names[0]]).itemsize
        return sum(math.prod(value.shape()) for value in cache.values) * itemsize

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.run(names.EMBED, {names.INPUT_IDS: input_ids})[names.TEXT_EMBEDS]  # [B, S, D]

    def _run_kv(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """decoder_kv.onnx on host tensors; outputs by name, as torch CPU tensors."""
        graph = self.manifest.kv_variant.graph
        with self._kv_lock:
            if self._kv_session is None:
                self._kv_session = new_session(self.directory / graph.file, [self.provider], self.threads)
        arrays = {spec.name: np.ascontiguousarray(feeds[spec.name].numpy(), dtype=spec.dtype) for spec in graph.inputs}
        outputs = self._kv_session.run(None, arrays)
        return {spec.name: torch.from_numpy(value) for spec, value in zip(graph.outputs, outputs)}

    def kv_head(self, value: ort.OrtValue, length: int) -> ort.OrtValue:
        head = np.ascontiguousarray(value.numpy()[:, :, :length])  # [B, Hkv, length, Dh]; via the host on CUDA
        return ort.OrtValue.ortvalue_from_numpy(head, self.device, 0)

    def _decode(self, cache: KVCache, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """One decoder pass with past = `cache`; the present outputs become `cache`."""
        binding = self.sessions[names.DECODER].io_binding()
        feeds = {names.INPUTS_EMBEDS: inputs_embeds, names.ATTENTION_MASK: attention_mask,
                 names.POSITION_IDS: position_ids}
        for name, value in feeds.items():
            array = self._array(names.DECODER, name, value)
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))
        for name, value in zip(self.past_names, cache.values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(names.LOGITS, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)  # allocated by ONNX Runtime, kept where the decoder runs
        self.sessions[names.DECODER].run_with_iobinding(binding)
        logits, *cache.values = binding.get_outputs()
        return torch.from_numpy(logits.numpy()[:, -1]).float()  # [B, V]

    def _array(self, stage: str, name: str, value: Any) -> np.ndarray:
        """A feed as a contiguous numpy array of the dtype the manifest gives that input."""
        if isinstance(value, torch.Tensor):
            value = value.numpy()
        return np.ascontiguousarray(value, dtype=self.dtypes[stage][name])
