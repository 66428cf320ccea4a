"""The TopK-gather op's contract, shared by the ONNX node and the TensorRT plugin; plain Python, tested on the CPU.

    TopKGather(scores [B, N], tokens [B, N, D], budget [] int64)
        -> kept_tokens [B, k, D] (tokens' dtype), kept_index [B, k] int64 ascending
    k = clamp(budget, min_kept, max_kept)

`budget` reaches TensorRT as a *shape input* of the plugin (ONNX attribute
`tensorrt_plugin_shape_input_indices`), so `k` is an expression of its value known before the
plugin runs, as with the standard TopK whose K is a shape tensor: no data-dependent output size.
TensorRT passes shape inputs to `get_output_shapes` only; `enqueue` sees scores and tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from covipal.errors import CovipalError

OP_TYPE = "TopKGather"  # the ONNX op type is also the plugin's name in TensorRT's registry
DOMAIN = "covipal"
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
SHAPE_INPUTS_ATTRIBUTE = "tensorrt_plugin_shape_input_indices"  # read by TensorRT's ONNX parser
BUDGET_INPUT = 2  # node inputs: scores, tokens, budget
NUM_OUTPUTS = 2  # kept_tokens, kept_index

# TensorRT DataType names: scores and tokens may be float32 or float16; kept_tokens follows tokens.
FLOAT_TYPES = ("FLOAT", "HALF")
INDEX_TYPE = "INT64"


@dataclass(frozen=True)
class TopKGatherFields:
    """The plugin's fields (ONNX attributes, serialized into the engine): the clamp range of k."""

    min_kept: int
    max_kept: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_kept <= self.max_kept:
            raise CovipalError(f"{OP_TYPE} needs 1 <= min_kept <= max_kept, got {self.min_kept}, {self.max_kept}")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Field name -> one-element int32 array, the form TensorRT's PluginField takes."""
        return {name: np.array([value], dtype=np.int32) for name, value in asdict(self).items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TopKGatherFields:
        missing = [name for name in cls.__dataclass_fields__ if name not in arrays]
        if missing:
            raise CovipalError(f"{OP_TYPE} plugin fields lack {', '.join(missing)}")
        return cls(**{name: int(np.asarray(arrays[name]).reshape(-1)[0]) for name in cls.__dataclass_fields__})


Dim = TypeVar("Dim")


class DimOps(Protocol, Generic[Dim]):
    """Arithmetic on dimensions: ints here, TensorRT's IDimensionExpr in the plugin."""

    def constant(self, value: int) -> Dim: ...
    def min(self, a: Dim, b: Dim) -> Dim: ...
    def max(self, a: Dim, b: Dim) -> Dim: ...


class IntOps:
    """`DimOps` on plain ints."""

    def constant(self, value: int) -> int:
        return value

    def min(self, a: int, b: int) -> int:
        return min(a, b)

    def max(self, a: int, b: int) -> int:
        return max(a, b)


def output_shapes(scores: Sequence[Dim], tokens: Sequence[Dim], budget: Dim, fields: TopKGatherFields,
                  ops: DimOps[Dim]) -> tuple[list[Dim], list[Dim]]:
    """kept_tokens [B, k, D] and kept_index [B, k] from scores [B, N], tokens [B, N, D] and the budget's value."""
    if len(scores) != 2 or len(tokens) != 3:
        raise CovipalError(f"{OP_TYPE} takes scores [B, N] and tokens [B, N, D], got ranks {len(scores)} "
                           f"and {len(tokens)}")
    kept = ops.min(ops.max(budget, ops.constant(fields.min_kept)), ops.constant(fields.max_kept))
    return [tokens[0], kept, tokens[2]], [scores[0], kept]


def output_types(input_types: Sequence[str]) -> list[str]:
    """kept_tokens has the tokens' type, kept_index is int64 (TensorRT DataType names)."""
    return [input_types[1], INDEX_TYPE]


def supports_types(pos: int, types: Sequence[str]) -> bool:
    """Whether I/O `pos` (scores, tokens, kept_tokens, kept_index) may have `types[pos]`, given types[:pos]."""
    if pos in (0, 1):
        return types[pos] in FLOAT_TYPES
    if pos == 2:
        return types[pos] == types[1]
    return pos == 3 and types[pos] == INDEX_TYPE


def check_shapes(scores: Sequence[int], tokens: Sequence[int], fields: TopKGatherFields) -> None:
    """Concrete shapes at run time: scores and tokens agree on B and N, and N covers max_kept."""
    if list(scores) != list(tokens[:2]):
        raise CovipalError(f"{OP_TYPE}: scores {list(scores)} and tokens {list(tokens)} disagree on [B, N]")
    if scores[1] < fields.max_kept:
        raise CovipalError(f"{OP_TYPE}: max_kept {fields.max_kept} exceeds the {scores[1]} tokens")
