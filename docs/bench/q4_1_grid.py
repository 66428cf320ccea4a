"""What the symmetric int4/int8 grid keeps of mini-llava's weights, which came from SmolLM2's Q4_1 GGUF.

Run: `.venv/bin/python docs/bench/q4_1_grid.py FP32_DIR INT4_DIR INT8_DIR` (the bench's mini-llava-fp32 export and
its quantized copies). Prints, per grid, the relative RMS error against the fp32 (= Q4_1-dequantized) weights and the
share of values that come back exactly, and the distinct values per 32-block along K of the fp32 weights (<= 16
means the Q4_1 blocks line up with ours).
"""

import sys

import numpy as np
import onnx
from onnx import numpy_helper

from covipal_export.export.qdq import quantized_weights

fp32_dir, int4_dir, int8_dir = sys.argv[1:4]
model = onnx.load(f"{fp32_dir}/decoder.onnx")
initializers = {t.name: t for t in model.graph.initializer}
weights = {n.name: numpy_helper.to_array(initializers[n.input[1]]) for n in model.graph.node
           if n.op_type == "MatMul" and n.input[1] in initializers}  # [K, N] per MatMul
for label, directory in (("int4", int4_dir), ("int8", int8_dir)):
    quantized = quantized_weights(onnx.load(f"{directory}/decoder.onnx"))
    error = norm = same = total = 0.0
    levels = []
    for name, weight in quantized.items():
        w = weights[name.rsplit("_Q", 1)[0]]
        scale = np.repeat(weight.scales, weight.block_size, axis=0)[: w.shape[0]]
        back = weight.q * scale
        error, norm = error + ((back - w) ** 2).sum(), norm + (w**2).sum()
        same += np.isclose(back, w, rtol=0, atol=1e-7 * np.abs(w).max()).sum()
        total += w.size
        if label == "int4":  # the fp32 weights' blocks, once
            blocks = w[: w.shape[0] // 32 * 32].reshape(-1, 32, w.shape[1])
            levels += [len(np.unique(blocks[0, :, j])) for j in range(0, w.shape[1], 97)]
    print(f"{label}: {len(quantized)} weights, relative RMS error {np.sqrt(error / norm):.4f}, "
          f"values kept exactly {100 * same / total:.2f}%")
print(f"fp32 distinct values per 32-block along K (sample of {len(levels)}): max {max(levels)}, "
      f"mean {np.mean(levels):.1f}")
