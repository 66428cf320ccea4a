"""Why ONNX Runtime's symmetric int4 GPTQ does worse than round-to-nearest on mini-llava: it packs other weights than
the ones its GPTQ computed.

Run: `.venv/bin/python docs/bench/gptq_sym_packing.py`. `gptq_quantize` (onnxruntime.quantization.neural_compressor.
weight_only) takes `gptq()`'s output Q, whose blocks sit on GPTQ's grid s * (-8..7) with s = 2 max|W| / 15, and
quantizes it again with `quant_tensor(..., "sym", "uint")`, which picks a new scale 2 max|Q| / 15 per block. max|Q| is
7s or 8s, so every block comes back scaled by 14/15 or 16/15: a 6.7% error the GPTQ updates never saw. With an
identity Hessian GPTQ is plain rounding on its own grid, so any difference printed here is the repacking alone.
"""

import numpy as np
from onnxruntime.quantization.neural_compressor.weight_only import gptq, quant_tensor

K, N, BLOCK = 64, 8, 32
weights = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)  # [K, N]
computed = gptq(weights.copy(), np.eye(K), num_bits=4, group_size=BLOCK, scheme="sym", percdamp=0.0)  # [K, N]
q, scale, zero = quant_tensor(computed.T.copy(), 4, BLOCK, "sym", "uint")  # what gptq_quantize packs, [N*K/B, B]
packed = ((q - zero) * scale).reshape(N, K).T  # [K, N]
nonzero = computed != 0
print(f"max |packed - computed| / max |W| = {np.abs(packed - computed).max() / np.abs(weights).max():.4f}")
print(f"packed / computed, per value: {sorted(set(np.round(packed[nonzero] / computed[nonzero], 4).tolist()))}")
