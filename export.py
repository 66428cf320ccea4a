"""`python export.py --model M --budget K`: ONNX export + manifest (not available yet)."""

import sys

if __name__ == "__main__":
    print("error: ONNX export is not available yet; for now, answer in PyTorch with "
          "`python -m covipal IMAGE QUESTION --budget K`", file=sys.stderr)
    raise SystemExit(2)
