"""`python export.py --model M --budget K`: ONNX graphs + manifest.json, verified against PyTorch.

Thin entry point (also the `covipal-export` command); the work is in `covipal_export.export`.
"""

from covipal_export.export.cli import console

if __name__ == "__main__":
    console()
