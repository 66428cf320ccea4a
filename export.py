"""`python export.py --model M --budget K`: ONNX graphs + manifest.json, verified against PyTorch.

Thin entry point; the work is in `covipal_export` (export_cli.py parses, exporter.py exports).
"""

from covipal.cli import run
from covipal_export.export_cli import main

if __name__ == "__main__":
    run(main)
