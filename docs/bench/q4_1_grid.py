"""What each int4/int8 grid keeps of mini-llava's weights, which came from SmolLM2's Q4_1 GGUF.

Run: `.venv/bin/python docs/bench/q4_1_grid.py FP32_DIR QUANT_DIR...` (mini-llava's fp32 export and quantized
copies of it: int4 rtn, int4 q4_1, int8 rtn). Prints, per copy, the relative RMS error of the rebuilt weights
(q x scale, plus the block offset for q4_1) against the fp32 (= Q4_1-dequantized) weights and the share of values
that come back exactly, and the distinct values per 32-block along K of the fp32 weights (<= 16 means the Q4_1
blocks line up with ours).
"""

import sys

import numpy as np
import onnx
from onnx import numpy_helper

from covipal_export.export.qdq import quantized_weights
from covipal_export.manifest import load_manifest

fp32_dir, quant_dirs = sys.argv[1], sys.argv[2:]
model = onnx.load(f"{fp32_dir}/decoder.onnx")
initializers = {t.name: t for t in model.graph.initializer}
weights = {n.name: numpy_helper.to_array(initializers[n.input[1]]) for n in model.graph.node
           if n.op_type == "MatMul" and n.input[1] in initializers}  # [K, N] per MatMul
levels = []
for directory in quant_dirs:
    quantized = quantized_weights(onnx.load(f"{directory}/decoder.onnx"))
    error = norm = same = total = 0.0
    for name, weight in quantized.items():
        w = weights[name.rsplit("_Q", 1)[0]]
        if directory == quant_dirs[0]:  # the fp32 weights' blocks, once
            blocks = w[: w.shape[0] // 32 * 32].reshape(-1, 32, w.shape[1])
            levels += [len(np.unique(blocks[0, :, j])) for j in range(0, w.shape[1], 97)]
        back = weight.q * np.repeat(weight.scales, weight.block_size, axis=0)[: w.shape[0]]
        if weight.offsets is not None:
            back = back + np.repeat(weight.offsets, weight.block_size, axis=0)[: w.shape[0]]
        error, norm = error + ((back - w) ** 2).sum(), norm + (w**2).sum()
        same += np.isclose(back, w, rtol=0, atol=1e-6 * np.abs(w).max()).sum()
        total += w.size
    print(f"{load_manifest(directory).quantization.summary()}: {len(quantized)} weights, relative RMS error "
          f"{np.sqrt(error / norm):.2e}, values kept exactly (within 1e-6 of each weight's largest) "
          f"{100 * same / total:.2f}%")
print(f"fp32 distinct values per 32-block along K (sample of {len(levels)}): max {max(levels)}, "
      f"mean {np.mean(levels):.1f}")
