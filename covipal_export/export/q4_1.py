"""llama.cpp's Q4_1 grid for the decoder's weights: gguf-py quantizes, `nbits.py` writes MatMulNBits + an offset.

Q4_1 cuts each weight's input dimension into blocks of 32 and stores, per block, a scale `d`, a minimum `m`
(both fp16) and 32 integers q in [0, 15]:  W ~= d * q + m.  Rounding to that grid is gguf-py's `Q4_1`
(`gguf.quants.quantize`, ggml-org's port of llama.cpp's reference quantizer), not ours.

Neither of our forms may carry a zero point (TensorRT's DequantizeLinear takes none), so the minimum is
written as an offset term beside a symmetric weight (`nbits.quantize_matmuls` writes it):

    W = d * (q - 8) + c,        c = m + 8 d           (one offset a block)
    x @ W = x @ (d * (q - 8)) + blocksum(x) @ c    blocksum(x) [.., K/32]: x summed over each block of 32

    decoder.onnx      MatMulNBits(x; q, scales d; no zero points, so its implicit 8)  -> Add <- MatMul(blocksum(x), c)
    decoder.qdq.onnx  the same, with DequantizeLinear(q - 8, d) -> MatMul in place of MatMulNBits (`qdq.py`)

A model whose weights came from a Q4_1 GGUF (mini-llava's SmolLM2-135M) gets every integer, scale and minimum of
that file back: the grid is the file's, so this int4 decoder loses nothing but the fp32 rounding of c.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np

from covipal_export.export.nbits import NBitsWeight

BLOCK = 32  # Q4_1's block
ZERO = 8  # MatMulNBits' implicit zero point for 4 bits: it computes (q - 8) * scale
LIBRARY = "gguf.quants Q4_1 (llama.cpp's quantizer, gguf-py {version})"


def library() -> str:
    return LIBRARY.format(version=version("gguf"))


def quantize_q4_1(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [K, N] -> q [N, K/32, 32] uint8 in [0, 15], d [N, K/32] and m [N, K/32] (fp32 holding fp16 values).

    A block whose weights are all equal has d = 0 in Q4_1; it gets the smallest fp16 normal instead (its q are all
    0 and its offset m + 8 d, so it still rebuilds to m exactly) because TensorRT refuses a zero scale.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    k, n = weight.shape
    rows = np.ascontiguousarray(weight.T, dtype=np.float32)  # [N, K]: Q4_1 blocks run along each row
    blocks = quantize(rows, GGMLQuantizationType.Q4_1).reshape(n, k // BLOCK, -1)  # [N, K/32, 20] bytes
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:]  # [N, K/32, 16]: value j in the low nibble of byte j, value j + 16 in its high nibble
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # [N, K/32, 32]
    d[d == 0] = np.finfo(np.float16).tiny
    return q, d, m


def q4_1_nbits(weight: np.ndarray) -> NBitsWeight:
    """weight [K, N] as MatMulNBits on q - 8 (its implicit zero point) with scales d, plus offsets m + 8 d."""
    k = weight.shape[0]
    if k % BLOCK:
        raise ValueError(f"Q4_1 needs an input dimension divisible by {BLOCK}, got {k}")
    q, d, m = quantize_q4_1(weight)  # [N, K/32, 32], [N, K/32], [N, K/32]
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # MatMulNBits' blob: two values a byte, the first in the low nibble
    return NBitsWeight(packed, d.astype(weight.dtype), (m + ZERO * d).T.astype(weight.dtype))
