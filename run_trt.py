"""`python run_trt.py IMAGE QUESTION`: answer on the best backend present (not available yet)."""

import sys

if __name__ == "__main__":
    print("error: the runtime (ONNX Runtime / TensorRT) is not available yet; for now, answer in PyTorch with "
          "`python -m covipal IMAGE QUESTION --budget K`", file=sys.stderr)
    raise SystemExit(2)
