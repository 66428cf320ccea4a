"""Random weights for a Hugging Face model, made one layer at a time: never a whole fp32 copy of the model.

    build on the meta device (nothing allocated)
      -> for each unit, in module order (an embedding, one encoder or decoder layer, a norm, the LM head):
           allocate it on the CPU in fp32 -> the model's own initializers (`_initialize_weights`, children first,
           dispatched to the sub-model that owns them, as `PreTrainedModel.initialize_weights` does) -> cast to dtype

A unit is a member of a `ModuleList` (a layer) or a module with no `ModuleList` inside. Peak memory is the
finished part of the model in its dtype plus one unit in fp32 (a 7B decoder layer: 0.8 GB). The values follow
Hugging Face's initializers and the torch seed, unit by unit; they are not the values of the model built whole
(whose construction draws from the seed too), so the model records the scheme (`ModelInfo.random_init`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as hf_init

RANDOM_INIT = "by-layer"  # ModelInfo.random_init of the models filled here


def fill_random(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Materialise a meta-device `model` on the CPU in `dtype` with seeded random weights, unit by unit."""
    for _ in fill_units(model, dtype):
        pass
    model.tie_weights()
    return model


def fill_units(model: PreTrainedModel, dtype: torch.dtype) -> Iterator[nn.Module]:
    """`fill_random` one unit at a time: yields each unit once it holds its weights (a caller may write it out and
    move it back to the meta device before the next one is made)."""
    with torch.no_grad(), hf_init.guard_torch_init_functions():
        for module, owner, whole in _units(model, model):
            module.to_empty(device="cpu", recurse=whole)
            if whole:
                _initialize(module, owner)
            else:  # a container, after its units: its own parameters, if any, and its own init
                owner._initialize_weights(module)
            yield module.to(dtype)


def _units(module: nn.Module, owner: PreTrainedModel) -> Iterator[tuple[nn.Module, PreTrainedModel, bool]]:
    """(module, the sub-model whose init applies, whether the module is a whole unit), children before parents."""
    owner = module if isinstance(module, PreTrainedModel) else owner
    if isinstance(module, nn.ModuleList) or any(isinstance(m, nn.ModuleList) for m in module.modules()):
        for child in module.children():
            yield from _units(child, owner)
        if not isinstance(module, nn.ModuleList):
            yield module, owner, False
        return
    yield module, owner, True


def _initialize(module: nn.Module, owner: PreTrainedModel) -> None:
    """`owner`'s init over `module`'s subtree, children first; a nested sub-model brings its own init."""
    for child in module.children():
        _initialize(child, child if isinstance(child, PreTrainedModel) else owner)
    owner._initialize_weights(module)
