"""TensorRT engines behind the backend interface: DIR/trt/<stage>.engine, run on torch CUDA tensors.

    load      each engine with the module that built it (`tensorrt` or `tensorrt_rtx`, from its .engine.json),
              after `engine_info.check_engine` (same TensorRT version, same GPU) and a check that it was built
              from this directory's graph (the TopKGather plugin registered first where the engine holds it);
              one execution context per engine, so concurrent calls to one engine take turns (a lock held
              from set_input_shape until the stream is synchronized); their KV caches stay apart
    run       inputs become torch CUDA tensors (the `budget` shape input stays in host memory, as TensorRT
              reads its value), set_input_shape, then each output's shape from get_tensor_shape (kept tokens
              [B, k, D] follow the budget), set_tensor_address, scratch memory for these shapes (a torch buffer
              that grows), execute_async_v3 on the backend's stream, which is synchronized before returning
    KV cache  the decoder's present.* tensors are the next step's past_key_values.*: the cache never leaves the
              GPU, new buffers come from torch's caching allocator, and only logits [B, V] are copied back
    prompt    covipal's host steps (text for scoring, splice of the kept tokens), fed by the engines
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covipal.errors import CovipalError
from covipal.pruning import PrunedPrompt
from covipal_export import names
from covipal_export.engine_info import (
    EngineInfo,
    check_engine,
    engine_path,
    gpu_target,
    import_tensorrt,
    make_logger,
    read_engine_info,
    rebuild_hint,
)
from covipal_export.manifest import Manifest
from covipal_export.plugin.trt_plugin import register_plugin
from covipal_export.runtime.backend import GraphBackend, KVCache

Feed = np.ndarray | torch.Tensor


class Engine:
    """One deserialized engine and its execution context; `run` maps input tensors to new CUDA output tensors."""

    def __init__(self, directory: Path, manifest: Manifest, stage: str):
        info: EngineInfo = read_engine_info(directory, stage)
        trt = import_tensorrt(info.module)
        check_engine(info, trt, gpu_target(trt), directory)
        built_from = manifest.trt_graph_file(stage)  # a quantized decoder's engine comes from its QDQ form
        if info.onnx_file != built_from or info.onnx_sha256 != manifest.files[built_from].sha256:
            raise CovipalError(f"{stage}.engine was built from another {built_from} than this export's: "
                               f"{rebuild_hint(directory)}")
        if info.gather == "plugin":  # a PPM engine built with `--gather plugin` holds the TopKGather plugin
            register_plugin(trt)
        self.stage, self.logger = stage, make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path(directory, stage).read_bytes())
        if self.engine is None:
            raise CovipalError(f"{trt.__name__} cannot load {stage}.engine ({'; '.join(self.logger.errors[-2:])}): "
                               f"{rebuild_hint(directory)}")
        # scratch memory sized for the shapes of each call, not for the profile's maxima (batch 8 x full context)
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.scratch: torch.Tensor | None = None
        self.inputs = [t.name for t in info.inputs]
        self.outputs = [t.name for t in info.outputs]
        self.dtypes = {t.name: getattr(torch, t.dtype) for t in info.inputs + info.outputs}
        self.dynamic = {name for name in self.inputs if -1 in tuple(self.engine.get_tensor_shape(name))}
        self.on_host = {name for name in self.inputs  # shape inputs (`budget`): TensorRT reads them on the host
                        if self.engine.get_tensor_location(name) == trt.TensorLocation.HOST}
        self.profiles = {p.name: p for p in info.profiles}
        self.placeholder = torch.empty(256, dtype=torch.uint8, device="cuda")  # empty tensors still need an address
        self.module = trt.__name__
        self.lock = threading.Lock()  # one execution context: one call at a time

    def run(self, feeds: dict[str, Feed], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Outputs as new CUDA tensors, ready when this returns; numpy feeds are cast and uploaded.

        The lock is held until `stream` is synchronized: the context's shapes, addresses and scratch memory
        belong to one call from set_input_shape to the end of the kernels."""
        with self.lock, torch.cuda.stream(stream):
            outputs = self._run(feeds)
            stream.synchronize()
        return outputs

    def _run(self, feeds: dict[str, Feed]) -> dict[str, torch.Tensor]:
        placed = {name: self._place(name, feeds[name]) for name in self.inputs}  # alive until enqueued
        for name, tensor in placed.items():
            if name in self.dynamic and not self.context.set_input_shape(name, tuple(tensor.shape)):
                profile = self.profiles[name]
                raise CovipalError(f"{self.stage}.engine takes {name} from {profile.min} to {profile.max}, "
                                   f"got {list(tensor.shape)}")
            self.context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name in self.outputs:  # known once the input shapes and the budget value are set
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CovipalError(f"{self.stage}.engine cannot tell the shape of {name} from its inputs: {shape}")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, self._address(outputs[name]))
        needed = self.context.update_device_memory_size_for_shapes()
        if self.scratch is None or self.scratch.numel() < needed:  # grows to the largest call so far
            self.scratch = torch.empty(max(needed, 256), dtype=torch.uint8, device="cuda")
        self.context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise CovipalError(f"{self.module} failed to run {self.stage}.engine: {'; '.join(self.logger.errors[-2:])}")
        return outputs

    def _place(self, name: str, value: Feed) -> torch.Tensor:
        dtype = self.dtypes[name]
        if not isinstance(value, torch.Tensor):  # numpy arrays and scalars; 0-d stays 0-d (the budget)
            array = np.asarray(value)
            value = torch.from_numpy(np.ascontiguousarray(array).reshape(array.shape))
        device = "cpu" if name in self.on_host else "cuda"
        return value.to(device=device, dtype=dtype, non_blocking=True).contiguous()

    def _address(self, tensor: torch.Tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self.placeholder.data_ptr()


class TrtBackend(GraphBackend):
    """The four engines on one GPU; the decoder's KV cache stays in CUDA tensors between steps."""

    def __init__(self, directory: str | Path, manifest: Manifest):
        super().__init__(manifest)
        directory = Path(directory)
        self.engines = {stage: Engine(directory, manifest, stage) for stage in names.STAGES}  # refuses stale engines
        self.stream = torch.cuda.Stream()
        self.decoder = self.engines[names.DECODER]
        self.name = self.decoder.module.replace("_", "-")  # "tensorrt" or "tensorrt-rtx"
        self.device = "cuda"
        self.past_names = names.past_names(manifest.decoder.num_layers)
        self.present_names = names.present_names(manifest.decoder.num_layers)

    def run(self, stage: str, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One engine on the backend's stream, synchronized: the outputs are ready when this returns."""
        return self.engines[stage].run(feeds, self.stream)

    def prefill(self, prompt: PrunedPrompt) -> tuple[torch.Tensor, KVCache]:
        decoder = self.manifest.decoder
        shape = (prompt.inputs_embeds.shape[0], decoder.num_kv_heads, 0, decoder.head_dim)  # [B, Hkv, 0, Dh]
        empty = torch.empty(shape, dtype=self.decoder.dtypes[self.past_names[0]], device="cuda")
        cache = KVCache([empty] * len(self.past_names))
        return self._decode(cache, prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids), cache

    def extend(self, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.run(names.EMBED, {names.INPUT_IDS: input_ids})[names.TEXT_EMBEDS]  # [B, S, D], on the GPU
        return self._decode(cache, embeds, attention_mask, position_ids)

    def full_kv_bytes(self, cache: KVCache) -> int:
        return sum(value.numel() * value.element_size() for value in cache.values)

    def kv_head(self, value: torch.Tensor, length: int) -> torch.Tensor:
        with torch.cuda.stream(self.stream):  # the stream the engines read it on
            head = value[:, :, :length].clone(memory_format=torch.contiguous_format)  # [B, Hkv, length, Dh]
        self.stream.synchronize()
        return head

    def _decode(self, cache: KVCache, inputs_embeds: Feed, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """One decoder pass with past = `cache`; the present outputs become `cache`."""
        feeds = {names.INPUTS_EMBEDS: inputs_embeds, names.ATTENTION_MASK: attention_mask,
                 names.POSITION_IDS: position_ids, **dict(zip(self.past_names, cache.values))}
        outputs = self.run(names.DECODER, feeds)
        cache.values = [outputs[name] for name in self.present_names]  # [B, Hkv, P + S, Dh], still on the GPU
        return outputs[names.LOGITS][:, -1].float().cpu()  # [B, V], the only copy back
