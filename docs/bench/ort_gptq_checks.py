"""Why ONNX Runtime's symmetric int4 GPTQ (onnxruntime 1.32) does no better than round-to-nearest on mini-llava.

Run: `.venv/bin/python docs/bench/ort_gptq_checks.py`. Two checks on random weights, with
`onnxruntime.quantization.neural_compressor.weight_only`'s own `gptq` and `quant_tensor`:

1. The calibration data has no effect. `gptq()` keeps W as [K, N] and its inverse Hessian as the upper-triangular
   Cholesky factor U, but propagates each column's error with U[i:, i] and U[i2:, i1:i2], the parts below the
   diagonal, which are zero. So two different Hessians give the same result as the identity: plain rounding.
2. The packed weights are not the ones GPTQ computed. `gptq()` returns values on its grid s * (-8..7) with
   s = 2 max|W| / 15 per block; `gptq_quantize` quantizes them again with a new scale 2 max|Q| / 15, so each block is
   stored 14/15 or 16/15 of what was computed.
"""

import numpy as np
from onnxruntime.quantization.neural_compressor.weight_only import gptq, quant_tensor

K, N, BLOCK = 64, 8, 32
rng = np.random.default_rng(0)
weights = rng.standard_normal((K, N)).astype(np.float32)  # [K, N]


def hessian(tokens: int) -> np.ndarray:
    x = rng.standard_normal((tokens, K)) @ rng.standard_normal((K, K))  # correlated inputs [T, K]
    return 2 * x.T @ x / tokens  # [K, K]


results = [gptq(weights.copy(), h, num_bits=4, group_size=BLOCK, scheme="sym")
           for h in (np.eye(K), hessian(256), hessian(512))]
print("1. same result for the identity and two data Hessians:",
      all(np.array_equal(results[0], other) for other in results[1:]))
computed = results[0]
q, scale, zero = quant_tensor(computed.T.copy(), 4, BLOCK, "sym", "uint")  # what gptq_quantize packs, [N*K/B, B]
packed = ((q - zero) * scale).reshape(N, K).T  # [K, N]
nonzero = computed != 0
print(f"2. packed / computed, per value: {sorted(set(np.round(packed[nonzero] / computed[nonzero], 4).tolist()))}; "
      f"max |packed - computed| / max |W| = {np.abs(packed - computed).max() / np.abs(weights).max():.4f}")
